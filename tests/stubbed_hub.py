"""Runs a vlmheads module's `main()` as a command line with the Hub client replaced: every `upload_folder` is
copied to `$STUBBED_HUB_UPLOADS/<n>/` (with the repository id in `repo_id.txt`), and nothing leaves the machine.

    STUBBED_HUB_UPLOADS=/tmp/uploads python tests/stubbed_hub.py vlmheads.examples.train_orion --push_to_hub ...
"""

import os
import runpy
import shutil
import sys
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi

UPLOADS = Path(os.environ["STUBBED_HUB_UPLOADS"])


def create_repo(self, repo_id, **kwargs):
    # The Hub puts a bare name into the namespace of the token's user.
    return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")


def upload_folder(self, *, repo_id, folder_path, **kwargs):
    target = UPLOADS / str(len(list(UPLOADS.glob("*"))))
    shutil.copytree(folder_path, target, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    (target / "repo_id.txt").write_text(repo_id)
    return "committed"


HfApi.create_repo = create_repo
HfApi.upload_folder = upload_folder

if __name__ == "__main__":
    module, *arguments = sys.argv[1:]
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
