"""Training against a store whose FPN features are transform-coded (``pca-std<k>``, basis in the schema)."""

import numpy as np

from student_fixtures import run_config, write_store

PCA = "pca-std4+blosc-zstd5-bitshuffle"


def test_a_pca_store_reads_close_to_float32_and_trains(world, tmp_path):
    from label_store import open_store
    from student_trainer.train import train_student

    url = write_store(tmp_path / "pca.zarr", world.teacher, world.annotations, world.images, groups=("cls", "box", "fpn"), codecs={"fpn": PCA})
    store, exact = open_store(str(url)), open_store(str(world.store_fp32))
    fpn = [spec for spec in store.targets if spec.group == "fpn"]
    assert fpn and all(spec.codec == PCA and spec.transform is not None for spec in fpn)
    key = store.keys()[0]
    got, want = store.read(*key), exact.read(*key)
    for spec in fpn:
        error = float(np.sqrt(np.mean((got[spec.name] - want[spec.name]) ** 2)))
        assert error < 0.25 * float(np.sqrt(np.mean(want[spec.name] ** 2))), spec.name
    train_student(run_config(world, tmp_path / "run", store=url, losses="ld,fgd"), progress=False)
    assert (tmp_path / "run" / "final.pt").is_file()


def test_read_through_fills_a_pca_store_with_the_stores_basis(world, tmp_path, capsys):
    import json

    from fake_endpoint import FakeEndpoint

    from detcore.coco import CocoDataset
    from detcore.views import content_hash
    from distillery.cli import main
    from label_store import open_store, verify_store
    from student_trainer.sources import ReadThroughSource, RemoteSource, StoreSource

    url = write_store(tmp_path / "partial.zarr", world.teacher, world.annotations, world.images,
                      groups=("cls", "box", "fpn"), codecs={"fpn": PCA}, image_ids=[1, 2])
    before = open_store(str(url))
    names = [spec.name for spec in before.targets]
    coco = CocoDataset(world.annotations, world.images)
    views = [view for view, _ in StoreSource(str(world.store_fp32), []).stored_views() if view.image_id == 3]
    assert views and not {v.key for v in views} & set(before.keys())
    with FakeEndpoint(world.teacher, token="tok") as endpoint:  # it serves float32: the filler encodes
        through = ReadThroughSource(StoreSource(str(url), names), RemoteSource(endpoint, names, token="tok"))
        try:
            through.get(views, image_paths=[str(coco.image_path(3))] * len(views), content_hashes=[content_hash(coco.load(3))] * len(views))
        finally:
            through.close()
    after, exact = open_store(str(url)), open_store(str(world.store_fp32))
    assert after.targets == before.targets  # the same bases: a fill never refits
    assert sorted(set(after.keys()) - set(before.keys())) == sorted(v.key for v in views)
    for view in views:
        got, want = after.read(*view.key), exact.read(*view.key)
        for spec in after.targets:
            codec = spec.target_codec
            assert codec.basis is spec.transform
            _, scale, _ = codec.encode(want[spec.name])
            bound = codec.error_bound(want[spec.name], scale) * 1.01 + 1e-4
            assert np.all(np.abs(got[spec.name] - want[spec.name]) <= bound), (view.key, spec.name)
    assert verify_store(str(url)).ok
    # `distill store inspect` names the transform codec of every fpn level.
    assert main(["store", "inspect", str(url), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    codecs = {target["name"]: target["codec"] for target in info["targets"]}
    assert {name: codec for name, codec in codecs.items() if name.startswith("fpn/")} == {spec.name: PCA for spec in before.targets if spec.group == "fpn"}
    assert main(["store", "inspect", str(url)]) == 0
    assert PCA in capsys.readouterr().out
