"""PyTorch Lightning (CPU, one device) under the preload. argv[1]: "automatic" (Lightning's
default: optimizer.step(closure)) or "manual" (manual_backward + opt.step()), argv[2]: steps.
Writes result.pt with the trained weights, the initial ones and the float64 reference."""
import copy
import sys
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import stacknet

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
import lightning as L  # noqa: E402

mode, steps = sys.argv[1], int(sys.argv[2])


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = stacknet.make()
        self.automatic_optimization = mode == "automatic"

    def training_step(self, batch, idx):
        loss = stacknet.loss_fn(self.net, batch)
        if mode == "manual":
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=stacknet.LR)


m = Module()
ref_model = copy.deepcopy(m.net)
init = stacknet.weights(m.net)
data = stacknet.batches(steps)
ds = TensorDataset(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))
trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
trainer.fit(m, DataLoader(ds, batch_size=8, shuffle=False))
stacknet.save(stacknet.out_path(), final=stacknet.weights(m.net), init=init, ref=stacknet.reference(ref_model, data))
print("ok")
