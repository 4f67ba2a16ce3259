# torch imported inside a function, after everything else has been imported.
import sys
import json, os, collections, argparse  # noqa: F401  (other imports first)


def main(steps):
    import torch
    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    print("trained", steps)


main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
