"""Strings that several parts of vlmheads must agree on: head kinds, task names, placeholder tokens, prompts.

The models, processors, pipelines, the server, the ONNX export and pipeline parallelism import these names instead
of spelling the strings again. Imports nothing: this file ships as remote code with every saved model.
"""

HEAD_GENERATION = "generation"
"""A plain VLM backbone: it answers in text with `generate` and has no task head."""
HEAD_CLASSIFICATION = "classification"
"""Image (+ prompt) → class logits (B, num_labels): `ReceiptVLClassifier`, `VLMForImageClassification`."""
HEAD_TRAJECTORY = "trajectory"
"""Driving features (+ images, prompt) → ego waypoints (B, T, D): `OrionQwen*ForTrajectory`, `VLMForTrajectory`."""
HEAD_ACTIONS = "actions"
"""Images + instruction (+ robot state) → an action chunk (B, chunk_size, action_dim): `VLAForActionPrediction`."""
HEAD_KINDS = (HEAD_GENERATION, HEAD_CLASSIFICATION, HEAD_TRAJECTORY, HEAD_ACTIONS)

TASK_IMAGE_CLASSIFICATION = "image-classification"
"""The Hugging Face pipeline task of the classifiers (transformers' own task name)."""
TASK_TRAJECTORY_PREDICTION = "trajectory-prediction"
"""The pipeline task of the driving models (registered by vlmheads)."""
TASK_ACTION_PREDICTION = "action-prediction"
"""The pipeline task of the VLAs (registered by vlmheads)."""
HEAD_TASKS = {
    HEAD_CLASSIFICATION: TASK_IMAGE_CLASSIFICATION,
    HEAD_TRAJECTORY: TASK_TRAJECTORY_PREDICTION,
    HEAD_ACTIONS: TASK_ACTION_PREDICTION,
}
"""The Hugging Face pipeline task that runs each head kind."""

SCENE_TOKEN = "<scene>"
"""Placeholder of one scene query row; the processor expands one into `num_scene_queries` tokens."""
HISTORY_TOKEN = "<history>"
"""Placeholder of one history query row; the processor expands one into `num_history_queries` tokens."""
CAN_BUS_TOKEN = "<can_bus>"
"""Placeholder of the CAN-bus vector: one token per sample."""
EGO_TOKEN = "<ego_wp>"
"""Where the trajectory is read: the decoder's hidden state at this token feeds the trajectory head."""
PLACEHOLDER_TOKENS = {"scene": SCENE_TOKEN, "history": HISTORY_TOKEN, "can_bus": CAN_BUS_TOKEN, "ego": EGO_TOKEN}
"""The driving placeholders by kind, in prompt order."""

DEFAULT_DRIVING_INSTRUCTION = "Plan a safe trajectory for the ego car."
"""The instruction of a driving prompt when the caller gives none."""
