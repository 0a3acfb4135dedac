"""TRL's GRPOTrainer (PyTorch, CPU) doing what `tandem-train bench-step` does, on the same model.

Same Hugging Face checkpoint (written by tandem-train), same prompt texts (no chat template), same
prompts per step, samples per prompt and response length (exactly --max-new-tokens: end of sequence
is suppressed with min_new_tokens), the same seeded-random rewards from {0, 0.25, 1}, no KL term and
no reference model (beta = 0, as GAPG), one optimiser step per batch, everything in one micro-batch.
Prints one JSON object: the median seconds per step over the timed steps (generation included).
"""

import argparse
import json
import random
import statistics
import tempfile
import time

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


class StepTimer(TrainerCallback):
    def __init__(self):
        self.started = None
        self.seconds = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts-file", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with open(args.prompts_file) as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    total = args.steps + args.warmup
    dataset = Dataset.from_dict({"prompt": [texts[i % len(texts)] for i in range(args.prompts * total)]})

    def reward(completions, **kwargs):
        return [random.choice([0.0, 0.25, 1.0]) for _ in completions]

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.prompts * args.group_size,
            gradient_accumulation_steps=1,
            num_generations=args.group_size,
            max_completion_length=args.max_new_tokens,
            generation_kwargs={"min_new_tokens": args.max_new_tokens},
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            beta=0.0,
            num_iterations=1,
            learning_rate=1e-4,
            max_grad_norm=1.0,
            max_steps=total,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            shuffle_dataset=False,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    timed = timer.seconds[args.warmup:]
    print(json.dumps({
        "step_seconds": statistics.median(timed),
        "all_step_seconds": timed,
        "torch": torch.__version__,
        "trl": trl.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
