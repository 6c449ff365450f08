"""One FSDP2 training step of a tiny Orion model on 2 CPU processes (gloo), against the same step unsharded.

    torchrun --nproc_per_node 2 fsdp2_step.py RESULTS.pt

Every decoder layer and then the whole model are sharded with `fully_shard`; both ranks see the same batch, so the
sharded step must give the unsharded loss and, after the optimizer step, the unsharded weights.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from vlmheads.data.driving import ARRAY_FIELDS, synthetic_driving_dataset
from vlmheads.offline import tiny_orion_model, tiny_orion_processor
from vlmheads.processing.collator_orion_qwen import OrionDataCollator

dist.init_process_group("gloo")
processor = tiny_orion_processor("qwen2_vl", num_scene_queries=4, num_history_queries=3)
dataset = synthetic_driving_dataset(4, seed=0, num_scene_queries=4, num_history_queries=3, with_answers=False)
records = dataset.with_format("numpy", columns=list(ARRAY_FIELDS), output_all_columns=True)
batch = OrionDataCollator(processor, with_answers=False)([records[index] for index in range(4)])


def step(model: torch.nn.Module) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


reference = tiny_orion_model(processor).train()
initial = {name: parameter.detach().clone() for name, parameter in reference.named_parameters()}
reference_loss = step(reference)

sharded = tiny_orion_model(processor).train()
for layer in sharded.model.language_model.layers:
    fully_shard(layer)
fully_shard(sharded)
sharded_loss = step(sharded)
weights = {name: parameter.full_tensor() for name, parameter in sharded.named_parameters()}
sharded_layers = sum(type(parameter).__name__ == "DTensor" for parameter in sharded.parameters())
if dist.get_rank() == 0:
    difference = max((weights[name] - value).abs().max().item() for name, value in reference.named_parameters())
    torch.save(
        {
            "world_size": dist.get_world_size(),
            "sharded_parameters": sharded_layers,
            "parameters": len(weights),
            "losses": (reference_loss, sharded_loss),
            "max_weight_difference": difference,
            "max_weight_change": max((weights[name] - value).abs().max().item() for name, value in initial.items()),
        },
        sys.argv[1],
    )
dist.destroy_process_group()
