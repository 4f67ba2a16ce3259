"""The one padded-batch builder: pre-tokenized rows -> right-padded tensors."""


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
