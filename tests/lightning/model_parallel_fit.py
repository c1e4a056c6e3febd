"""A fit of the GLUE task module with AdaLoRA, on one process or sharded by Lightning's ModelParallelStrategy (FSDP2)
over CPU processes (gloo). A script, not a test: ModelParallelStrategy starts its other ranks by running the same
command again, so tests/lightning/test_model_parallel.py runs this file in a subprocess.

Each rank writes ``rank<N>.json`` into ``--out``: the adapters gathered whole, the masks, the budget and ranks, and the
bytes of the frozen base this rank holds.

    python tests/lightning/model_parallel_fit.py --backbone DIR --out DIR --devices 2 --max-steps 12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from adalora_pl.sharding import local, whole  # noqa: E402
from adalora_pl.tasks.glue_module import GLUEClassifier  # noqa: E402

ROWS, GLOBAL_BATCH = 64, 8


class Rows(pl.LightningDataModule):
    """Fixed token rows in file order (no shuffling: a distributed sampler gives rank r the rows r, r + N, ...)."""

    def __init__(self, batch_size: int, vocab: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(5, vocab, (ROWS, 12), generator=g)
        labels = torch.randint(0, 2, (ROWS,), generator=g)
        self.rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y}
                     for i, y in zip(ids, labels, strict=True)]
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        # Lightning's own distributed sampler shuffles training data: this one keeps file order on every rank.
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = DistributedSampler(self.rows, num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=False, sampler=sampler)


class Report(pl.Callback):
    """Writes this rank's view of the run at the end of training (the gathers are collectives: every rank calls)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: GLUEClassifier) -> None:
        adapters = {f"{n}.{k}": whole(getattr(m, k).detach()).tolist()
                    for n, m in pl_module.adapters.items() for k in ("lora_A", "lora_E", "lora_B")}
        cb = pl_module.schedule_callback
        frozen_local = sum(local(p).numel() * p.element_size() for p in pl_module.parameters() if not p.requires_grad)
        frozen_whole = sum(p.numel() * p.element_size() for p in pl_module.parameters() if not p.requires_grad)
        report = {
            "adapters": adapters, "masks": cb.allocator.rank_pattern(), "ranks": cb.allocator.kept_ranks(),
            "budget": cb.budget, "last_step": cb.allocator.last_step, "frozen": cb.allocator.frozen,
            "importance_steps": cb.allocator.importance_steps, "frozen_bytes_here": frozen_local,
            "frozen_bytes": frozen_whole, "world": trainer.world_size, "global_step": trainer.global_step,
            "sharded": any(type(p).__name__ == "DTensor" for p in pl_module.parameters()),
            "adapter_dtypes": sorted({str(p.dtype) for n, p in pl_module.named_parameters() if ".lora_" in n}),
            "base_dtypes": sorted({str(p.dtype) for p in pl_module.parameters() if not p.requires_grad}),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class FailOnRank(pl.Callback):
    """A wrong input found by one rank only (its data shard, say): the other rank must not wait for it forever."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_fit_start(self, trainer: pl.Trainer, pl_module: GLUEClassifier) -> None:
        if trainer.global_rank == self.rank:
            from adalora_pl.errors import ConfigError

            raise ConfigError(f"a bad input seen by rank {self.rank} only")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--total-step", type=int, default=16)
    parser.add_argument("--ckpt-in", default=None)
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps into --out/ckpt")
    parser.add_argument("--init-r", type=int, default=3)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--consolidated", action="store_true",
                        help="ModelParallelStrategy(save_distributed_checkpoint=False): one checkpoint file")
    parser.add_argument("--strategy", default=None, help="model_parallel: shard even on one device (default: "
                                                           "ModelParallelStrategy on more than one)")
    parser.add_argument("--fail-on-rank", type=int, default=None, help="raise a ConfigError in setup on this rank")
    parser.add_argument("--start-E", type=float, default=0.5,
                        help="std of a normal start for the singular values (0: the reference's E = 0). With E = 0 "
                             "the first gradients of E are ~1e-8 (products of two N(0, 0.02) factors), at the level "
                             "of the rounding of their reduction, and Adam (eps 1e-8) turns that rounding into "
                             "+-lr updates: two runs that sum in another order then agree only to +-lr per step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    module = GLUEClassifier(task_name="cola", backbone=args.backbone, method="adalora", init_r=args.init_r,
                            target_r=1, tinit=2, tfinal=4, delta_t=1, total_step=args.total_step,
                            learning_rate=5e-3, orth_reg_weight=0.1)
    if args.start_E:
        with torch.no_grad():
            for layer in module.adapters.values():
                layer.lora_E.normal_(0.0, args.start_E)
    callbacks: list[pl.Callback] = [Report(out)]
    if args.fail_on_rank is not None:
        callbacks.append(FailOnRank(args.fail_on_rank))
    if args.save_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.save_every,
                                                      save_top_k=-1, filename="{step}"))
    if args.devices > 1 or args.strategy == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1,
                                         save_distributed_checkpoint=not args.consolidated)
    else:
        strategy = "auto"
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy,
                         max_steps=args.max_steps, precision=args.precision,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=bool(args.save_every), num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=str(out), callbacks=callbacks, deterministic=True,
                         use_distributed_sampler=False)
    vocab = module.model.config.vocab_size
    trainer.fit(module, datamodule=Rows(GLOBAL_BATCH // args.devices, vocab), ckpt_path=args.ckpt_in)


if __name__ == "__main__":
    main()
