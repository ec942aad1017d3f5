"""The sparse adapter in an ``accelerate`` loop: the Accelerator prepares model, router
optimizer and data; the CPU rows step through the row optimizer, which ``save_state``
checkpoints with the rest. Under fp16 (``--mixed_precision fp16`` on a GPU) the rows'
gradients carry the GradScaler's scale: the row optimizer divides it out.

    python examples/accelerate_loop.py --tiny   # a tiny random LLaMA: a few seconds on a CPU
    python examples/accelerate_loop.py --mixed_precision fp16   # on a GPU (one process)
"""

import torch
from accelerate import Accelerator
from example_setup import arguments, batches, check_reload, load, loader

import meft_ds

args = arguments(__doc__, mixed_precision=True)
accelerator = Accelerator(mixed_precision=args.mixed_precision)
base, tokenizer = load(args)

model = meft_ds.get_sparse_model(base, meft_ds.SparseConfig())
# the routers and LoRA, grouped as the options ask (e.g. sparse_lora_weight_decay)
routers = torch.optim.AdamW(model.parameter_groups(), lr=args.lr, weight_decay=0.0)
model, routers, data = accelerator.prepare(model, routers, loader(tokenizer, args.batch_size))
meft = accelerator.unwrap_model(model)
rows = meft.row_optimizer()
accelerator.register_for_checkpointing(rows)  # save_state/load_state: the rows' Adam state

model.train()
for step, batch in enumerate(batches(data, args.steps), 1):
    loss = model(**batch).loss
    accelerator.backward(loss)
    accelerator.unscale_gradients()  # fp16: the routers' gradients (the rows' at their step)
    scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
    norm, coef = meft.clip_grad_norm_(1.0, loss_scale=scale)
    lr = routers.param_groups[0]["lr"]
    routers.step()
    rows.step(lr, loss_scale=scale, clip_coef=coef, skip=routers.step_was_skipped)
    routers.zero_grad()
    accelerator.print(f"step {step} loss {loss.item():.4f} grad_norm {norm:.3f}")

accelerator.save_state(f"{args.output_dir}/state")  # model (rows included), both optimizers
if accelerator.is_main_process:
    meft.save_pretrained(f"{args.output_dir}/adapter", tokenizer)
    reloaded = meft_ds.MeftModel.from_pretrained(load(args)[0], f"{args.output_dir}/adapter")
    check_reload(meft, reloaded.to(accelerator.device), tokenizer)
