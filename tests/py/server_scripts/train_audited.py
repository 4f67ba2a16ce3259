"""A user's tiny training run (3 SGD steps) that installs POLICY (argv[1], a JSON file) itself;
prints the file descriptors it holds open for writing at the end, as JSON, on stdout.
usage: train_audited.py POLICY [STEPS]"""
import json
import os
import sys

import torch

import safehook

torch.set_num_threads(1)
torch.manual_seed(0)
safehook.install(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 8), torch.randn(32, 1)
for step in range(steps):
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink("/proc/self/fd/" + fd)
        flags = open("/proc/self/fdinfo/" + fd).read().split("flags:")[1].split()[0]
    except OSError:
        continue
    if int(flags, 8) & (os.O_WRONLY | os.O_RDWR):
        fds[fd] = target
print(json.dumps({"pid": os.getpid(), "writable": fds}), flush=True)
