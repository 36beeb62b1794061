"""One TRL DPOTrainer run, as a user's script would do it; started by ``benchmarks/vs_trl.py``.

This file runs inside the TRL environment that ``vs_trl.py`` creates (``.venv-trl`` beside ``.venv``:
TRL installed over the same torch / transformers / accelerate as preftune's environment), never inside
preftune's: it imports nothing from preftune. It loads the policy by path and the reference model as a
separate ``PreTrainedModel`` (``ref_model``), reads the pairs from a JSONL file of
``{"prompt", "chosen", "rejected"}`` rows, builds ``DPOConfig(**config)`` from the JSON the harness
passes, trains one epoch and saves the final model with ``trainer.save_model`` (as a user's script would).

What it writes for the harness:

* ``--steps-file``: one JSON line per logged step, written and flushed in ``on_log`` (the harness times
  the appearance of these lines, exactly as it times preftune's ``metrics.jsonl``):
  ``{"step", "loss", "t_step_end", "t_log"}`` (``time.perf_counter`` in this process, CLOCK_MONOTONIC).
* ``--info-file``: versions, the resolved settings that matter for the comparison (bf16, gradient
  checkpointing, optimizer, sampler, reference handling) and the token counts of TRL's own tokenisation
  of the data (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` after ``DPOTrainer.__init__``).

    .venv-trl/bin/python benchmarks/trl_dpo_runner.py --model M --ref-model R --data D.jsonl \
        --output-dir OUT --steps-file steps.jsonl --info-file info.json --threads 2 --config '{"beta": 0.1}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="policy: a Hugging Face model directory (with tokenizer)")
    parser.add_argument("--ref-model", required=True, help="reference model directory")
    parser.add_argument("--data", required=True, help="JSONL of prompt / chosen / rejected rows, in training order")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps-file", required=True)
    parser.add_argument("--info-file", required=True)
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    parser.add_argument("--config", default="{}", help="DPOConfig keyword arguments as a JSON object")
    parser.add_argument("--no-save", action="store_true", help="skip trainer.save_model at the end")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    import accelerate
    import datasets
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepLog(TrainerCallback):
        """A line per logged step: the loss TRL logs and when the step ended (perf_counter)."""

        def __init__(self, path: str) -> None:
            self.file = open(path, "w", encoding="utf-8")  # closed in on_train_end
            self.step_end = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                line = {"step": state.global_step, "loss": float(logs["loss"]), "t_step_end": self.step_end,
                        "t_log": time.perf_counter()}
                self.file.write(json.dumps(line) + "\n")
                self.file.flush()

        def on_train_end(self, args, state, control, **kwargs):
            self.file.close()

    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    config = DPOConfig(output_dir=args.output_dir, **json.loads(args.config))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ref_model = AutoModelForCausalLM.from_pretrained(args.ref_model, dtype=torch.float32)
    trainer = DPOTrainer(model=args.model, ref_model=ref_model, args=config,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[StepLog(args.steps_file)])
    data = trainer.train_dataset
    tokens = {name: int(sum(len(ids) for ids in data[f"{name}_ids"])) for name in ("prompt", "chosen", "rejected")}
    info = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "accelerate": accelerate.__version__, "datasets": datasets.__version__},
        "torch_file": torch.__file__,
        "threads": torch.get_num_threads(),
        "resolved": {"bf16": bool(config.bf16), "fp16": bool(config.fp16),
                     "gradient_checkpointing": bool(config.gradient_checkpointing),
                     "optim": str(getattr(config.optim, "value", config.optim)),
                     "lr_scheduler_type": str(getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)),
                     "precompute_ref_log_probs": bool(config.precompute_ref_log_probs),
                     "train_sampling_strategy": str(config.train_sampling_strategy),
                     "loss_type": list(config.loss_type), "beta": config.beta, "max_length": config.max_length,
                     "truncation_mode": config.truncation_mode, "padding_free": bool(trainer.padding_free),
                     "device": str(config.device)},
        "pairs": len(data), "tokens": tokens,
    }
    Path(args.info_file).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    trainer.train()
    if not args.no_save:
        trainer.save_model(str(Path(args.output_dir) / "final"))


if __name__ == "__main__":
    main()
