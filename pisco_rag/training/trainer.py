"""Sequence-level distillation of a PISCO / OSCAR model with transformers' ``Trainer``.

The student (compressor + decoder) reads each record's documents as memories and learns to
write the target answer (a teacher's ``label`` or the gold ``answer``): cross-entropy on the
answer tokens only, with exactly the prompt used at inference (``renderer.pisco_turns`` +
``render``, then the answer tokens and eos). What trains:

- PISCO: ``encoder_adapter`` and ``decoder_adapter`` (LoRA) and the embedding rows of the added
  tokens (``<MEM0..>``, ``<AE>``, ``<ENC>``, ``<SEP>``): a gradient hook zeroes every other row,
  and the embedding group has no weight decay, so the base vocabulary never moves;
- OSCAR: the compressor (fully, or LoRA with its memory/rerank token rows), connector and
  reranking head, and ``decoder_adapter``; with ``teacher_scores`` the head is distilled
  (weight ``rerank_weight``, 0.05) with an L2 term on the scores (``rerank_loss="l2"``, as in
  OSCAR) or, scale-free, the cross-entropy of the head's softmax over each question's documents
  against the teacher's (``"listwise"``, teacher scores divided by ``RERANK_TEMPERATURE``).

AdamW (weight decay 0.1, none on biases/norms/embeddings), separate learning rates for the
compressor and the decoder, 5% linear warm-up then linear decay, gradient clipping 1.0,
gradient accumulation, bf16 autocast on GPU, checkpoints every ``save_steps`` (pisco-rag native
format + ``trainable.safetensors`` + the Trainer's optimizer/scheduler/RNG state) and resume,
periodic evaluation (loss, and optionally Match of generated answers).

The pieces: ``config.TrainConfig`` (hyper-parameters), ``collator.DistillationCollator``
(records to tensors), ``student.StudentModule`` (the differentiable forward and its losses),
``trainable`` (what trains, resumable state); this module runs them with ``Trainer``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..adapters import DECODER, use_adapter
from ..errors import PiscoInputError
from ..model import PiscoModel
from .collator import DistillationCollator
from .config import TrainConfig
from .data import load_records, resolve_target_field, training_target
from .student import StudentModule
from .trainable import TrainableSetup, load_trainable, save_trainable, setup_trainable

logger = logging.getLogger(__name__)


def save_checkpoint(pisco: PiscoModel, directory: str | os.PathLike[str]) -> None:
    """The native pisco-rag format (``PiscoModel.from_pretrained`` reads it); a LoRA-tuned
    first-layers compressor is stored by reference (its LoRA factors), like the decoder."""
    pisco.config.trained = True
    pisco.save_pretrained(directory)


class PiscoTrainer(Trainer):
    """``Trainer`` with pisco-rag's parameter groups, native checkpoints and loss logging."""

    def __init__(
        self,
        *args: Any,
        pisco: PiscoModel,
        setup: TrainableSetup,
        answer_eval: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pisco = pisco
        self.setup = setup
        self.answer_eval = answer_eval or []
        self._parts: dict[str, list[float]] = {}

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            args = self.args
            self.optimizer = torch.optim.AdamW(
                self.setup.groups,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
            )
        return self.optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        outputs = model(**inputs)
        if model.training:
            for key in ("ce_loss", "rerank_loss", "context_kl", "hidden_distance"):
                if key in outputs:
                    self._parts.setdefault(key, []).append(float(outputs[key]))
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for key, values in self._parts.items():
                if values:
                    logs[key] = round(sum(values) / len(values), 4)
            self._parts = {}
        super().log(logs, start_time)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        if self.answer_eval:
            extra = generation_match(self.pisco, self.answer_eval)
            self.log(extra)
            metrics.update(extra)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        save_checkpoint(self.pisco, output_dir)
        save_trainable(self.setup, output_dir)
        args = {k: v for k, v in self.args.to_dict().items() if _jsonable(v)}
        Path(output_dir, "training_args.json").write_text(json.dumps(args, indent=2) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_trainable(self.setup, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        ckpt = self.state.best_model_checkpoint
        if ckpt:
            load_trainable(self.setup, ckpt)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def generation_match(
    pisco: PiscoModel, records: Sequence[dict[str, Any]], max_new_tokens: int = 32
) -> dict[str, float]:
    """Match of compressed-RAG answers on ``records`` (gold ``answer``), without the store,
    and the answer-likelihood diagnostics (``answer_diagnostics``): they show memories
    starting to carry the answer long before Match moves."""
    from ..evaluation.metrics import answer_metrics
    from ..evaluation.runner import answer_diagnostics

    was_training = pisco.model.training
    pisco.model.eval()
    if pisco.compressor is not None:
        pisco.compressor.eval()
    pisco.refresh_fingerprint()
    try:
        contexts = []
        for rec in records:
            queries = [rec["question"]] * len(rec["documents"]) if pisco.config.is_oscar else None
            contexts.append(pisco.compress(rec["documents"], queries=queries, use_store=False))
        questions = [r["question"] for r in records]
        preds = pisco.generate(questions, contexts, max_new_tokens=max_new_tokens)
        diagnostics = answer_diagnostics(
            pisco,
            questions,
            [r["documents"] for r in records],
            contexts,
            [r["answer"] for r in records],
        )
    finally:
        if was_training:
            pisco.model.train()
            if pisco.compressor is not None:
                pisco.compressor.train()
    m = answer_metrics(preds, [r["answer"] for r in records])
    return {
        "eval_match": m["match"],
        "eval_f1": m["f1"],
        **{f"eval_{k}": round(v, 4) for k, v in diagnostics.items()},
    }


def _default_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def train(
    model: PiscoModel,
    train_data: Any,
    eval_data: Any = None,
    config: TrainConfig | None = None,
    *,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[TrainerCallback] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Distil ``model`` on ``train_data`` (JSONL path, saved dataset, ``datasets.Dataset`` or
    list of records); returns ``{"final": dir, "global_step": n, "log_history": [...]}``.

    ``resume_from_checkpoint``: a ``checkpoint-N`` directory of an earlier run (with the same
    model and settings), or True for the latest one in ``output_dir``. The final model is saved
    in the native format under ``output_dir/final``; ``model`` is trained in place and left in
    eval mode with a fresh fingerprint.
    """
    if config is None:
        if "output_dir" not in overrides:
            raise PiscoInputError("train() needs config=TrainConfig(...) or output_dir=")
        config = TrainConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if model.dtype in (torch.float16, torch.bfloat16):
        logger.warning(
            "the model's weights are %s: training updates in half precision lose small steps; "
            "load it with dtype=torch.float32 (bf16 autocast is used on GPU)",
            model.dtype,
        )
    train_ds = load_records(train_data)
    if "split" in train_ds.column_names and "eval" in set(train_ds["split"]):
        raise PiscoInputError(
            "train_data holds records of the evaluation split (split='eval'): never train on "
            "them; build training records with `pisco-rag build-data --split train`"
        )
    target = resolve_target_field(train_ds.column_names, config.target_field)
    missing = sum(1 for t in train_ds[target] if t is None or t == "" or t == [])
    if missing:
        train_ds = train_ds.filter(lambda r: training_target(r, target) is not None)
        logger.warning("%d training records have no %r and are skipped", missing, target)
        if len(train_ds) == 0:
            raise PiscoInputError(f"no training record has a {target!r}")
    if "teacher_scores" in train_ds.column_names and (
        model.compressor is None or model.compressor.head is None
    ):
        logger.warning("teacher_scores are ignored: the model has no reranking head")
        train_ds = train_ds.remove_columns("teacher_scores")
    eval_ds = load_records(eval_data, split="validation") if eval_data is not None else None
    eval_target = None
    if eval_ds is not None:
        eval_target = target if target in eval_ds.column_names else "answer"
        if eval_target not in eval_ds.column_names:
            raise PiscoInputError(f"eval data has neither {target!r} nor 'answer'")
        if "teacher_scores" in eval_ds.column_names and (
            model.compressor is None or model.compressor.head is None
        ):
            eval_ds = eval_ds.remove_columns("teacher_scores")

    if config.calibrate_memories and model.config.memory_shift is None:
        sample = train_ds.select(range(min(len(train_ds), 32)))
        texts = [d for r in sample for d in r["documents"]]
        queries = [r["question"] or "" for r in sample for _ in r["documents"]]
        model.calibrate_memories(texts, queries if model.config.is_oscar else None)
        logger.info("memories standardised on %d training documents", len(texts))
    distil = config.context_distillation > 0 or config.hidden_distillation > 0
    collator = DistillationCollator(
        model,
        target,
        config.max_answer_tokens,
        text_teacher=distil,
        text_context_ratio=config.text_context_ratio,
    )
    eval_collator = DistillationCollator(model, eval_target, config.max_answer_tokens)
    if config.group_by_length:  # the sampler groups evaluation batches too
        train_ds = _with_lengths(train_ds, collator, config.show_progress)
        if eval_ds is not None:
            eval_ds = _with_lengths(eval_ds, eval_collator, config.show_progress)
    bf16 = _default_bf16() if config.bf16 is None else config.bf16
    has_eval = eval_ds is not None
    arguments = dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.decoder_lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="linear",
        max_grad_norm=config.max_grad_norm,
        max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_eval and config.eval_steps else "no",
        eval_steps=config.eval_steps if has_eval and config.eval_steps else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        bf16=bf16,
        seed=config.seed,
        dataloader_num_workers=config.dataloader_num_workers,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=not config.show_progress,
        use_cpu=model.device.type == "cpu",
    )
    args = TrainingArguments(**{**arguments, **config.extra_args})  # extra_args override
    answer_eval = None
    if has_eval and config.eval_generate:
        if "answer" not in eval_ds.column_names:
            raise PiscoInputError("eval_generate needs an 'answer' field in the eval data")
        answer_eval = [eval_ds[i] for i in range(min(config.eval_generate, len(eval_ds)))]
    student = StudentModule(
        model,
        rerank_weight=config.rerank_weight,
        context_distillation=config.context_distillation,
        hidden_distillation=config.hidden_distillation,
        rerank_loss=config.rerank_loss,
    )
    setup = setup_trainable(student, config)
    try:
        if config.gradient_checkpointing:
            model.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        trainer = PiscoTrainer(
            model=student,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=collator,
            callbacks=callbacks,
            pisco=model,
            setup=setup,
            answer_eval=answer_eval,
        )
        if eval_ds is not None:
            trainer.get_eval_dataloader = _eval_loader(trainer, eval_collator)
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        if eval_ds is not None:
            trainer.evaluate()
    finally:
        student.eval()
        setup.restore()
        if config.gradient_checkpointing:
            model.model.activation_checkpointing_disable()
        use_adapter(model.model, DECODER)
        model.refresh_fingerprint()
    final = Path(config.output_dir) / "final"
    save_checkpoint(model, final)
    history = trainer.state.log_history
    (Path(config.output_dir) / "train_log.json").write_text(json.dumps(history, indent=2) + "\n")
    return {
        "final": str(final),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss if not math.isnan(result.training_loss) else None,
        "log_history": history,
    }


def _with_lengths(ds: Any, collator: DistillationCollator, show_progress: bool) -> Any:
    """``ds`` with a ``length`` column (decoder row lengths) for the length-grouped sampler."""
    if "length" in ds.column_names:
        ds = ds.remove_columns("length")
    rows = tqdm(ds, desc="decoder row lengths", disable=not show_progress, leave=False)
    return ds.add_column("length", [collator.decoder_length(r) for r in rows])


def _eval_loader(trainer: PiscoTrainer, collator: DistillationCollator):
    original = trainer.get_eval_dataloader

    def get_eval_dataloader(eval_dataset: Any = None):
        saved = trainer.data_collator
        trainer.data_collator = collator
        try:
            return original(eval_dataset)
        finally:
            trainer.data_collator = saved

    return get_eval_dataloader


__all__ = ["PiscoTrainer", "generation_match", "save_checkpoint", "train"]
