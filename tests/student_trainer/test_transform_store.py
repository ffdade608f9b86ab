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
