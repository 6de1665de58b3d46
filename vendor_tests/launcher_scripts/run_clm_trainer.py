"""Causal language modelling with `Trainer`, as transformers' `examples/pytorch/language-modeling/run_clm.py`
does it: `HfArgumentParser` over model/data/training dataclasses, `AutoConfig`/`AutoTokenizer`,
`AutoModelForCausalLM.from_pretrained` (fine-tune) or `.from_config` (from scratch), text grouped
into blocks, `Trainer.train(resume_from_checkpoint=...)`, `save_model`, `evaluate`.

run_clm.py itself is in neither the transformers wheel nor its sdist, and needs `datasets` and
`evaluate`; this script keeps its command line (the flags below have run_clm's names) without them.
It knows nothing of LCAAM: `lcaam-patch run --preset transformers -- run_clm_trainer.py ...` patches it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)


@dataclass
class ModelArguments:
    """Which model to fine-tune, or train from scratch (run_clm's names)."""

    model_name_or_path: str | None = field(default=None)
    config_name: str | None = field(default=None)
    tokenizer_name: str | None = field(default=None)


@dataclass
class DataTrainingArguments:
    """The text files and the block size (run_clm's names)."""

    train_file: str = field(default="")
    validation_file: str | None = field(default=None)
    block_size: int = field(default=16)


class Blocks(torch.utils.data.Dataset):
    """Concatenated token ids cut into blocks, labels = inputs (run_clm's `group_texts`)."""

    def __init__(self, path: str, tokenizer, block_size: int) -> None:
        with open(path, encoding="utf-8") as f:
            ids = [i for line in f if line.strip() for i in tokenizer(line.strip())["input_ids"]]
        total = len(ids) // block_size * block_size
        self.blocks = [ids[i : i + block_size] for i in range(0, total, block_size)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = torch.tensor(self.blocks[index])
        return {"input_ids": block, "labels": block.clone()}


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)
    config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    train = Blocks(data_args.train_file, tokenizer, data_args.block_size)
    evaluation = (
        Blocks(data_args.validation_file, tokenizer, data_args.block_size) if data_args.validation_file else None
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train if training_args.do_train else None,
        eval_dataset=evaluation if training_args.do_eval else None,
        data_collator=default_data_collator,
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    sys.exit(main())
