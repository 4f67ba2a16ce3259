"""Rows and batches: the one padded-batch builder (pre-tokenized rows -> right-padded tensors)
and the one row fingerprint (which training row is which, in the monitor's rollback records
and in shaping's flag records alike)."""
import hashlib


def pad_batch(rows, pad_id=0, device=None):
    """(input_ids, attention_mask, labels) of ROWS, right-padded: input_ids with PAD_ID, labels
    with -100, attention_mask 1 on real tokens. A row is a dict {"input_ids", "labels"} (labels
    default to input_ids) or an (input_ids, labels) pair. Tensors are long, on DEVICE."""
    import torch
    pairs = [(r["input_ids"], r.get("labels", r["input_ids"])) if isinstance(r, dict) else r for r in rows]
    n = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), n), dtype=torch.long)
    for i, (si, sl) in enumerate(pairs):
        ids[i, :len(si)] = torch.as_tensor(si, dtype=torch.long)
        labels[i, :len(sl)] = torch.as_tensor(sl, dtype=torch.long)
        mask[i, :len(si)] = 1
    if device is not None:
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    return ids, mask, labels


# -- row fingerprints --
_MASK64 = (1 << 64) - 1


def _s64(x):
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_K1, _K2, _K3, _K4 = (_s64(0x9E3779B97F4A7C15), _s64(0xD1B54A32D192ED03),
                      _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB))


def row_hashes(ids, mask=None):
    """One int64 per row of IDS (a 1-D tensor is one row): a mixing hash of the row's tokens,
    where masked-out (padding) tokens are left out and positions count unmasked tokens only, so
    padding, left or right, does not change it. Elementwise int64 ops with wrap-around plus one
    sum per row: the same on every device, and no host sync."""
    import torch
    x = ids.reshape(1, -1) if ids.dim() == 1 else ids.reshape(ids.shape[0], -1)
    x = x.to(torch.int64)
    m = torch.ones_like(x) if mask is None else mask.reshape(x.shape).to(torch.int64)
    pos = m.cumsum(1) - 1
    c = pos * _K1 + _K2
    c = c ^ (c >> 31)
    c = c * _K3
    t = (x + 1) * c
    t = t ^ (t >> 29)
    t = t * _K4
    return (t * m).sum(1)


def hexdigest(h, n):
    """The fingerprint string of a row hash H over N tokens: 16 hex digits."""
    return hashlib.blake2b(b"%d:%d" % (h & _MASK64, n), digest_size=8).hexdigest()


def fingerprints(input_ids, attention_mask=None):
    """The fingerprints of the rows of INPUT_IDS (a tensor; 1-D: one row): 16 hex digits each,
    over the tokens the attention mask keeps (all of them without a mask). One host sync."""
    hs = row_hashes(input_ids, attention_mask)
    lens = (attention_mask.reshape(hs.shape[0], -1).sum(1).tolist() if attention_mask is not None
            else [input_ids.numel() // hs.shape[0]] * hs.shape[0])
    return [hexdigest(h, int(n)) for h, n in zip(hs.tolist(), lens)]


def fingerprint(tokens):
    """The fingerprint of one row given as its tokens (a list of ids or a 1-D tensor), padding
    left out: the string fingerprints() gives that row in any batch."""
    import torch
    return fingerprints(torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1))[0]
