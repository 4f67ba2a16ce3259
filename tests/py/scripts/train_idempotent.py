# Several optimizers, a wrapper optimizer whose step calls the inner one, and one optimizer
# stepped twice in a training step.
import torch

torch.set_num_threads(1)


class Wrapper(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer: an Optimizer whose step calls another's."""

    def __init__(self, inner):
        self.inner = inner
        super().__init__(inner.param_groups, {})

    def step(self, closure=None):
        return self.inner.step(closure)


a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
opt_b = Wrapper(torch.optim.Adam(b.parameters()))
for _ in range(3):
    for m, o in ((a, opt_a), (b, opt_b)):
        o.zero_grad()
        m(torch.randn(2, 4)).sum().backward()
        o.step()
opt_a.step()  # twice in the last training step
print("done")
