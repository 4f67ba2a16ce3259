"""A user's training job on a shared server, with the site's freeze of block "0" (the system
policy), in one of several ways; an attack suite's common part.

usage: train.py OUT MODE
  normal        3 SGD steps, saves OUT (safetensors)
  manual        re-enables the frozen block's gradients and updates every parameter by hand
  clear_hooks   clears torch's global optimizer hooks, re-enables the frozen block, steps
  close_features  calls safehook's private boot._close_features(), re-enables the block, steps
  save_txt      as manual, saved with torch.save under OUT (any name: a .txt)
  manual_np     as manual, saved with safetensors' numpy writer (no torch save function at all)
  base          saves the initial weights (the site's base model) and stops
  eval          forward passes only, nothing saved
  dataloader    as normal, its batches from a DataLoader with 2 forked workers (about 2 s)
  spawn         as normal, then a multiprocessing spawn child that runs a forward pass
OUT "-" saves nothing. Prints "trained" (or "evaluated") once done."""
import os
import sys

import torch


class SlowRows(torch.utils.data.Dataset):
    """Rows that take a while to load, so the DataLoader's workers live a few seconds."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import time
        time.sleep(0.1)
        return self.x[i], self.y[i]


def child_forward():
    import torch as t
    return float(t.nn.Linear(2, 1)(t.ones(1, 2)).sum())


def main(out, mode):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def loss_of(xb, yb):
        return torch.nn.functional.mse_loss(model(xb), yb)

    def unfreeze():
        for p in model.parameters():
            p.requires_grad_(True)

    if mode == "base":  # the site's base model: the weights every run starts from
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
        return
    if mode == "eval":
        with torch.no_grad():
            print(float(loss_of(x, y)))
        print("evaluated", flush=True)
        return
    if mode == "clear_hooks":
        import torch.optim.optimizer as o
        o._global_optimizer_pre_hooks.clear()
        o._global_optimizer_post_hooks.clear()
        unfreeze()
    if mode == "close_features":
        from safehook.runtime import boot
        boot._close_features()
        unfreeze()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if mode == "dataloader":
        batches = list(torch.utils.data.DataLoader(SlowRows(x, y), batch_size=8, num_workers=2))
    else:
        batches = [(x, y)] * 3
    for xb, yb in batches[:3]:
        if mode in ("manual", "save_txt", "manual_np"):
            unfreeze()
            model.zero_grad()
            loss_of(xb, yb).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            continue
        opt.zero_grad()
        loss_of(xb, yb).backward()
        opt.step()
    if mode == "spawn":
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(1) as pool:
            pool.apply(child_forward)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if out == "-":
        pass  # nothing saved: the process alone is looked at
    elif mode == "save_txt":
        torch.save(sd, out)
    elif mode == "manual_np":
        from safetensors.numpy import save_file as save_np
        save_np({k: v.numpy() for k, v in sd.items()}, out)
    else:
        from safetensors.torch import save_file
        save_file(sd, out)
    print("trained", flush=True)
    if os.environ.get("SH_SLEEP"):  # a job that keeps running a while after its training
        import time
        time.sleep(float(os.environ["SH_SLEEP"]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
