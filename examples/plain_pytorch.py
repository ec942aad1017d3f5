"""The sparse adapter in a plain PyTorch loop: the routers on an AdamW, the CPU rows on the
row optimizer, one global gradient clip over both.

    python examples/plain_pytorch.py --tiny   # a tiny random LLaMA: a few seconds on a CPU
    python examples/plain_pytorch.py          # SmolLM2-135M-Instruct, 100 steps
"""

import torch
from example_setup import arguments, batches, check_reload, load, loader

import meft_ds

args = arguments(__doc__)
base, tokenizer = load(args)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# 1. build: the adapter's routers are the model's trainable parameters, its key/value rows
#    (and their Adam state) live in CPU RAM
model = meft_ds.get_sparse_model(base, meft_ds.SparseConfig()).to(device)
model.print_trainable_parameters()
# the routers and LoRA, grouped as the options ask (e.g. sparse_lora_weight_decay)
routers = torch.optim.AdamW(model.parameter_groups(), lr=args.lr, weight_decay=0.0)
schedule = torch.optim.lr_scheduler.LambdaLR(routers, lambda step: 1 - step / args.steps)
rows = model.row_optimizer()  # AdamW over the selected rows, at lr x rows.lr_ratio

# 2. train
model.train()
for step, batch in enumerate(batches(loader(tokenizer, args.batch_size), args.steps), 1):
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    norm, coef = model.clip_grad_norm_(1.0)  # routers and rows by one global norm
    lr = schedule.get_last_lr()[0]
    routers.step()
    rows.step(lr, clip_coef=coef)  # the rows after the routers, at the same rate
    routers.zero_grad()
    schedule.step()
    print(f"step {step} loss {loss.item():.4f} grad_norm {norm:.3f} lr {lr:.2e}")

# 3. save: the launcher's export format (launch/evaluate.py --adapter reads it too)
model.save_pretrained(f"{args.output_dir}/adapter", tokenizer)
reloaded = meft_ds.MeftModel.from_pretrained(load(args)[0], f"{args.output_dir}/adapter")
check_reload(model, reloaded.to(device), tokenizer)
