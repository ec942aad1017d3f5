"""The sparse adapter in a stock ``transformers.Trainer``: MeftCallback steps the CPU rows
after each optimizer step, clips routers and rows together by ``max_grad_norm``, and keeps
the rows and their Adam state in every checkpoint, so ``resume_from_checkpoint`` works.

    python examples/hf_trainer.py --tiny   # a tiny random LLaMA: a few seconds on a CPU
    python examples/hf_trainer.py          # SmolLM2-135M-Instruct, 100 steps
"""

import functools

import torch
from example_setup import arguments, check_reload, dataset, load
from transformers import Trainer, TrainingArguments

import meft_ds
from meft_ds.data import collate
from meft_ds.integrations.hf import MeftCallback

args = arguments(__doc__)
base, tokenizer = load(args)
model = meft_ds.get_sparse_model(base, meft_ds.SparseConfig())
training = TrainingArguments(
    output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
    learning_rate=args.lr, weight_decay=0.0, max_grad_norm=1.0, save_steps=args.steps // 2,
    logging_steps=1, report_to=[], disable_tqdm=True, use_cpu=not torch.cuda.is_available())
# the routers and LoRA, grouped as the options ask (MeftCallback refuses an optimizer that
# misses a group's setting, e.g. sparse_lora_weight_decay)
optimizer = torch.optim.AdamW(model.parameter_groups(), lr=args.lr, weight_decay=0.0)
trainer = Trainer(model=model, args=training, train_dataset=dataset(tokenizer),
                  data_collator=functools.partial(collate, pad_id=tokenizer.pad_token_id or 0),
                  callbacks=[MeftCallback()], optimizers=(optimizer, None))
trainer.train()  # resume_from_checkpoint=True continues from the last checkpoint
for record in trainer.state.log_history:
    if "loss" in record:
        print(f"step {record['step']} loss {float(record['loss']):.4f}")

model.save_pretrained(f"{args.output_dir}/adapter", tokenizer)
reloaded = meft_ds.MeftModel.from_pretrained(load(args)[0], f"{args.output_dir}/adapter")
check_reload(model, reloaded.to(model.device), tokenizer)
