"""Prune and distill a BERT-style classifier with the Transformers Trainer (tiny random models, no downloads).

    PYTHONPATH=. python examples/transformers_trainer.py --steps 60

The only additions to a plain Trainer script are marked with `# <-`. A second `train()` call resumes
from the last checkpoint: masks, schedule position and step count come back from
`checkpoint-N/compression_state.pt`.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from compress_callbacks import CompressionManager, DistillationLoss
from compress_callbacks.integrations.transformers import CompressionCallback, DistillationTrainer

VOCAB = 200


def bert(hidden: int, layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, vocab_size=VOCAB, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 16), generator=g)
    labels = (ids[:, 0] < VOCAB // 2).long()  # the first token decides
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default=None)
    options = parser.parse_args(argv)
    output_dir = options.output_dir or tempfile.mkdtemp(prefix="cc_trainer_")
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU

    train_data = dataset(512, seed=2)
    teacher = bert(hidden=64, layers=2, seed=1)
    teacher_args = TrainingArguments(f"{output_dir}/teacher", max_steps=2 * options.steps, per_device_train_batch_size=16,
                                     learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=teacher, args=teacher_args, train_dataset=train_data).train()  # a fine-tuned teacher
    student = bert(hidden=32, layers=2, seed=0)
    recipe = {"callbacks": {"GradualMagnitudePruning": {
        "target_sparsity": 0.8, "start_step": options.steps // 6, "end_step": options.steps * 2 // 3,
        "update_every": 5, "exclude": ["re:.*classifier.*"]}}}
    manager = CompressionManager.from_recipe(recipe)  # <- or from_recipe("examples/recipe.yaml")
    args = TrainingArguments(output_dir, max_steps=options.steps, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=2e-3, logging_steps=10,
                             save_steps=options.steps // 2, report_to=[], use_cpu=True, disable_tqdm=True)
    half = TrainingArguments(**{**args.to_dict(), "max_steps": options.steps // 2})
    common = dict(train_dataset=train_data, distillation=DistillationLoss(teacher, temperature=2.0, alpha=0.7))

    # first half, then a fresh trainer resuming from the checkpoint, as after an interruption
    DistillationTrainer(model=student, args=half, callbacks=[CompressionCallback(manager)], **common).train()  # <-
    resumed = CompressionManager.from_recipe(recipe)
    trainer = DistillationTrainer(model=student, args=args, callbacks=[CompressionCallback(resumed)], **common)
    trainer.train(resume_from_checkpoint=True)

    sparsity = resumed.callbacks[0].overall_sparsity()
    table = resumed.summary()
    compressed = resumed.finalize(trainer.model)  # <- plain BertForSequenceClassification, zeros baked in
    evaluation = dataset(256, seed=3)
    ids = torch.stack([row["input_ids"] for row in evaluation])
    labels = torch.stack([row["labels"] for row in evaluation])

    def accuracy(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())

    return (
        f"steps {resumed.step} (resumed from step {options.steps // 2}), pruned-layer sparsity {sparsity:.3f}, "
        f"held-out accuracy: teacher {accuracy(teacher):.3f}, pruned student {accuracy(compressed):.3f}\n{table}"
    )


if __name__ == "__main__":
    print(main())
