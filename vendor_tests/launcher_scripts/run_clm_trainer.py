"""Causal language modelling with `Trainer`, written after transformers'
`examples/pytorch/language-modeling/run_clm.py`: `HfArgumentParser` over model/data/training
dataclasses, `AutoConfig`/`AutoTokenizer`, `AutoModelForCausalLM.from_pretrained` (fine-tune)
or `.from_config` (from scratch), text files read with `datasets.load_dataset("text")`,
tokenized and cut into blocks, `Trainer.train(resume_from_checkpoint=...)`, `save_model`,
`evaluate` with `evaluate.load("accuracy")`.

run_clm.py itself ships in neither the transformers wheel nor its sdist, so CI runs this
script, which takes run_clm's flags (those below); `vendor_tests/test_launcher_scripts.py`
runs run_clm.py too when `LCAAM_RUN_CLM` names a copy. It knows nothing of LCAAM:
`lcaam-patch run --preset transformers -- run_clm_trainer.py ...` patches it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import evaluate
import numpy as np
import torch
from datasets import load_dataset
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


def blocks(texts: dict[str, list[Any]], size: int) -> dict[str, list[Any]]:
    """Each column concatenated and cut into blocks of `size` (the remainder dropped); labels = inputs."""
    joined = {name: [item for row in rows for item in row] for name, rows in texts.items()}
    usable = len(joined["input_ids"]) // size * size
    cut = {name: [items[i : i + size] for i in range(0, usable, size)] for name, items in joined.items()}
    cut["labels"] = [list(block) for block in cut["input_ids"]]
    return cut


def next_token_predictions(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """The predicted token ids (the arg max of the logits)."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


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
    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    raw = load_dataset("text", data_files=files)
    with training_args.main_process_first(desc="tokenize and cut into blocks"):
        tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
        grouped = tokenized.map(lambda batch: blocks(batch, data_args.block_size), batched=True)
    accuracy = evaluate.load("accuracy")

    def compute_metrics(predicted: Any) -> dict[str, float]:
        predictions, labels = predicted
        return accuracy.compute(predictions=np.ravel(predictions[:, :-1]), references=np.ravel(labels[:, 1:]))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=grouped["train"] if training_args.do_train else None,
        eval_dataset=grouped["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=next_token_predictions,
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
