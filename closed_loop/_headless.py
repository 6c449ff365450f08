"""Headless simulators: MuJoCo renders through EGL (OSMesa where no EGL library is found), pygame through SDL's dummy
video driver, and a missing simulator package raises an ImportError naming the `sim` extra."""

import ctypes.util
import importlib
import os
from types import ModuleType

SIM_EXTRA_HINT = 'pip install "vlmheads[sim]"'


def configure_headless() -> None:
    """Sets the rendering back ends before MuJoCo or pygame are imported; settings the user made are kept."""
    backend = "egl" if ctypes.util.find_library("EGL") else "osmesa"
    os.environ.setdefault("MUJOCO_GL", backend)
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")


def import_simulator(name: str) -> ModuleType:
    """Imports a simulator package headless (e.g. "metaworld", "highway_env"), or says how to install it."""
    configure_headless()
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"{name} is not installed: closed-loop evaluation needs the sim extra, {SIM_EXTRA_HINT}."
        ) from error
