"""Reading from torch DataLoader worker processes, and pickling."""

from __future__ import annotations

import pickle

import numpy as np
import torch  # a project requirement; label_store itself imports without it (test_store_import.py)

from label_store import create_store, open_store


class _TargetsDataset(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader
        self.keys = reader.keys()

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        return {name: torch.from_numpy(array) for name, array in self.reader.read(*self.keys[index]).items()}


def collate_targets(batch):
    return {name: torch.stack([item[name] for item in batch]) for name in batch[0]}


def _fill(tmp_path, fingerprint, specs, make_record, make_targets, count=6):
    url = str(tmp_path / "store.zarr")
    store = create_store(url, fingerprint, specs, views_per_shard=4)
    with store.open_part("p") as part:
        for image_id in range(count):
            part.append(make_record(image_id), make_targets(specs, image_id))
        part.commit()
    return url


def test_dataloader_workers_read_the_same_targets(tmp_path, fingerprint, specs, make_record, make_targets):
    reader = open_store(_fill(tmp_path, fingerprint, specs, make_record, make_targets), expected_fingerprint=fingerprint, threads=2)
    direct = [reader.read(*key) for key in reader.keys()]  # the parent opens its handles first
    loader = torch.utils.data.DataLoader(_TargetsDataset(reader), batch_size=2, num_workers=2, collate_fn=collate_targets)
    batches = list(loader)
    assert len(batches) == 3
    for b, batch in enumerate(batches):
        for name, tensor in batch.items():
            assert tensor.dtype == torch.float32 and tensor.shape[0] == 2
            expected = np.stack([direct[2 * b][name], direct[2 * b + 1][name]])
            assert np.array_equal(tensor.numpy(), expected)


def test_reader_pickles_without_handles(tmp_path, fingerprint, specs, make_record, make_targets):
    reader = open_store(_fill(tmp_path, fingerprint, specs, make_record, make_targets, count=2), threads=2)
    first = reader.read_many(reader.keys())
    assert reader._state is not None and reader._state.executor is not None
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._state is None and len(clone) == 2
    again = clone.read_many(clone.keys())
    for a, b in zip(first, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
