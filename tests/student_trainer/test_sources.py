"""Target sources: one interface; the remote client's protocol, retries and refusals."""

import pytest
import torch

from fake_endpoint import FakeEndpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["cls/p3", "box/p4", "fpn/p5", "backbone/c4"]


def _batch_views(world):
    from detcore.coco import CocoDataset
    from detcore.views import content_hash, render
    from student_trainer.sources import StoreSource

    stored = dict(StoreSource(str(world.store_fp32), []).stored_views())
    views = [v for v in stored if v.key in {(1, 1), (3, 0)}]
    coco = CocoDataset(world.annotations, world.images)
    images = torch.stack([render(coco.load(v.image_id), v).image for v in views])
    paths = [str(coco.image_path(v.image_id)) for v in views]
    return views, images, paths, [content_hash(coco.load(v.image_id)) for v in views]


def test_every_source_gives_the_same_targets_for_the_same_views(world):
    from student_trainer.sources import InProcessTeacherSource, ReadThroughSource, RemoteSource, StoreSource

    views, images, paths, hashes = _batch_views(world)
    store = StoreSource(str(world.store_fp32), NAMES)
    inprocess = InProcessTeacherSource(str(world.teacher), NAMES)
    with FakeEndpoint(world.teacher, token="tok") as url:
        remote = RemoteSource(url, NAMES, token="tok", expected_fingerprint=store.fingerprint)
        through = ReadThroughSource(store, RemoteSource(url, NAMES, token="tok"))
        results = {
            "store": store.get(views),
            "inprocess": inprocess.get(views, images=images),
            "remote": remote.get(views, image_paths=paths, content_hashes=hashes),
            "read-through": through.get(views, image_paths=paths, content_hashes=hashes),
        }
        remote.close()
    for kind, targets in results.items():
        assert sorted(targets) == sorted(NAMES), kind
        for name in NAMES:
            assert targets[name].shape[0] == 2 and targets[name].dtype == torch.float32
            torch.testing.assert_close(targets[name], results["inprocess"][name], rtol=1e-4, atol=1e-5, msg=f"{kind} {name}")
    assert through.fetched_views == 0  # both views are in the store


def test_remote_refuses_a_bad_token(world):
    from student_trainer.sources import RemoteSource, RemoteSourceError

    with FakeEndpoint(world.teacher, token="right") as url:
        with pytest.raises(RemoteSourceError, match=r"Got 401 \(check --token\)"):
            RemoteSource(url, NAMES, token="wrong")


def test_remote_gives_up_after_bounded_retries(world):
    from student_trainer.sources import RemoteSource, RemoteSourceError

    views, _, paths, _ = _batch_views(world)
    endpoint = FakeEndpoint(world.teacher, token="tok", overload_first=100)
    with endpoint as url:
        remote = RemoteSource(url, NAMES, token="tok", max_retries=2, backoff_s=0.01)
        with pytest.raises(RemoteSourceError, match="after 3 attempts. Last: HTTP 503"):
            remote.get(views, image_paths=paths)
    assert endpoint.overloaded == 3 and remote.retries_done == 2


def test_remote_backoff_is_bounded_and_honours_retry_after(world):
    from student_trainer.sources import RemoteSource

    remote = RemoteSource.__new__(RemoteSource)
    remote.backoff_s, remote.max_backoff_s = 0.5, 4.0
    assert [remote._delay(a, None) for a in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert remote._delay(0, "2") == 2.0 and remote._delay(0, "120") == 4.0 and remote._delay(1, "soon") == 1.0


def test_remote_connection_errors_are_retried_then_reported():
    import httpx

    from student_trainer.sources import RemoteSource, RemoteSourceError

    calls = []

    def refuse(request):
        calls.append(request.url.path)
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(RemoteSourceError, match="after 3 attempts. Last: ConnectError"):
        RemoteSource("http://teacher.invalid", NAMES, max_retries=2, backoff_s=0.0, transport=httpx.MockTransport(refuse))
    assert calls == ["/v1/teacher"] * 3


def test_endpoint_with_another_teacher_is_refused(world, tmp_path):
    from student_fixtures import make_teacher
    from student_trainer.sources import RemoteSource, StoreSource, TeacherMismatchError

    other = make_teacher(tmp_path / "other.pt", seed=5)
    store = StoreSource(str(world.store), NAMES)
    with FakeEndpoint(other, token="tok") as url:
        with pytest.raises(TeacherMismatchError, match="checkpoint_sha256"):
            RemoteSource(url, NAMES, token="tok", expected_fingerprint=store.fingerprint)


def test_endpoint_that_renders_other_pixels_is_refused(world):
    from student_trainer.sources import RemoteSource, RemoteSourceError

    views, _, paths, hashes = _batch_views(world)
    with FakeEndpoint(world.teacher, token="tok") as url:
        remote = RemoteSource(url, NAMES, token="tok")
        with pytest.raises(RemoteSourceError, match="endpoint hash"):
            remote.get(views, image_paths=paths, content_hashes=["0" * 32, hashes[1]])
