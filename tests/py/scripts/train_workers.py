# Forked DataLoader workers and a spawned child that trains.
import multiprocessing as mp
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset


def child(steps):
    torch.set_num_threads(1)
    m = torch.nn.Linear(4, 1)
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(steps):
        o.zero_grad()
        m(torch.randn(2, 4)).sum().backward()
        o.step()


if __name__ == "__main__":
    torch.set_num_threads(1)
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    loader = DataLoader(data, batch_size=4, num_workers=2, multiprocessing_context="fork")
    m = torch.nn.Linear(4, 1)
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    n = 0
    for x, y in loader:
        o.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        o.step()
        n += 1
    p = mp.get_context("spawn").Process(target=child, args=(2,))
    p.start()
    p.join()
    sys.exit(p.exitcode)
