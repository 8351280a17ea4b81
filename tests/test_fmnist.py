"""Fashion-MNIST (kql.datasets) and the CNN trained on it (kql.zoo).

The data comes from the Debian package ``dataset-fashion-mnist`` (``make test``
installs it). The network is trained once per run by the ``fmnist_net`` fixture
(tests/conftest.py) and must really have learnt: at least 80% on 1,000 test
images. Through the public API, as a 1-channel model registered with
``zoo.FMNIST_SPEC``, its EXACT heatmaps equal its NAIVE ones.
"""
from __future__ import annotations

import gzip
import threading
import time

import numpy as np
import pytest
import torch

import kql
from kql import datasets, sources, zoo
from kql.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from kql.errors import PlanError


@pytest.fixture(scope="module")
def test_set():
    return load_fashion_mnist("test")


@pytest.fixture(scope="module")
def con(fmnist_net):
    con = kql.connect(progress="off")
    con.register_model("fmnist", fmnist_net, **zoo.FMNIST_SPEC)
    return con


# -- the data set -------------------------------------------------------------------------


@pytest.mark.parametrize("split, count", [("train", 60000), ("test", 10000)])
def test_splits_load_with_balanced_labels(split, count):
    images, labels = load_fashion_mnist(split)
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [count // 10] * 10      # 10 classes, equally many each
    assert images.min() == 0 and images.max() == 255
    assert images.flags.writeable                                   # a copy, not a view of the file


def test_class_names_and_first_test_image(test_set):
    images, labels = test_set
    assert FASHION_MNIST_CLASSES == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert datasets.fashion_mnist_available()


def test_missing_package_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    assert not datasets.fashion_mnist_available()
    with pytest.raises(PlanError) as e:
        load_fashion_mnist("test")
    assert str(e.value) == (f"Fashion-MNIST file not found: '{tmp_path}/t10k-images-idx3-ubyte.gz'; "
                            f"install the Debian package: apt-get install dataset-fashion-mnist")


def test_missing_file_in_a_given_folder(tmp_path):
    with pytest.raises(PlanError) as e:
        load_fashion_mnist("train", root=tmp_path)
    assert str(e.value) == (f"Fashion-MNIST file not found: '{tmp_path}/train-images-idx3-ubyte.gz'; "
                            f"the folder must hold the gzipped IDX files of the package "
                            f"dataset-fashion-mnist")


def test_unknown_split():
    with pytest.raises(PlanError) as e:
        load_fashion_mnist("validation")
    assert str(e.value) == "Fashion-MNIST has splits 'train' and 'test', not 'validation'"


def _write_idx(path, magic: int, shape, payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in shape)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def test_malformed_files(tmp_path):
    images, labels = tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz"
    _write_idx(labels, 0x801, (10000,), bytes(10000))

    _write_idx(images, 0x801, (2, 28, 28), bytes(2 * 784))        # a labels header
    with pytest.raises(PlanError) as e:
        load_fashion_mnist("test", root=tmp_path)
    assert str(e.value) == (f"'{images}' is not an IDX file of 3-D unsigned bytes: header 00000801, "
                            f"expected 00000803")

    _write_idx(images, 0x803, (2, 28, 28), bytes(784))             # truncated
    with pytest.raises(PlanError) as e:
        load_fashion_mnist("test", root=tmp_path)
    assert str(e.value) == f"'{images}' holds 784 bytes of data; its header 2x28x28 needs 1568"

    _write_idx(images, 0x803, (2, 28, 28), bytes(2 * 784))         # too few images
    with pytest.raises(PlanError) as e:
        load_fashion_mnist("test", root=tmp_path)
    assert str(e.value) == (f"Fashion-MNIST test set in '{tmp_path}' has images (2, 28, 28) and labels "
                            f"(10000,); expected (10000, 28, 28) and (10000,)")

    images.write_bytes(b"not gzip")
    with pytest.raises(PlanError, match=r"^cannot read '.*t10k-images-idx3-ubyte.gz': not a complete gzip"):
        load_fashion_mnist("test", root=tmp_path)


# -- the trained network ------------------------------------------------------------------


def test_trained_net_has_learnt(fmnist_net):
    accuracy = zoo.evaluate_fmnist(fmnist_net, count=1000)
    assert accuracy >= 0.8, f"test accuracy {accuracy:.3f} on 1,000 images"


def test_input_is_what_kql_feeds_the_registered_model(test_set):
    images, _ = test_set
    spec = sources.spec_from_module("fmnist", zoo.fmnist_cnn(), **zoo.FMNIST_SPEC)
    assert spec.channels == 1 and spec.input_size == (28, 28) and spec.num_classes == 10
    for image in images[:3]:
        x, _ = sources.preprocess(sources.load_image(image), spec)
        torch.testing.assert_close(x, zoo.fmnist_input(image[None])[0], rtol=0, atol=1e-5)


def test_training_is_deterministic_and_leaves_global_state_alone():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = zoo.train_fmnist(epochs=0.01)           # 9 steps: enough to tell two runs apart
    b = zoo.train_fmnist(epochs=0.01)
    c = zoo.train_fmnist(epochs=0.01, seed=1)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a[0].weight, c[0].weight)
    assert not a.training
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("call", [lambda folder: zoo.train_fmnist(architecture="resnet", root=folder),
                                  lambda folder: zoo.trained_fmnist_net(folder / "zoo", architecture="resnet")])
def test_unknown_architecture_is_refused_before_any_work(call, tmp_path):
    with pytest.raises(PlanError, match=r"^unknown Fashion-MNIST architecture 'resnet': cnn, se$"):
        call(tmp_path)
    assert not any(tmp_path.iterdir())      # no cache folder made, no data looked for


def test_cache_trains_once_under_concurrency_and_retrains_a_broken_file(monkeypatch, tmp_path):
    calls = []

    def fake_train(**kwargs):
        calls.append(kwargs)
        time.sleep(0.3)                       # long enough for the other callers to queue up
        torch.manual_seed(len(calls))
        return zoo.fmnist_cnn().eval()

    monkeypatch.setattr(zoo, "train_fmnist", fake_train)
    nets = []
    workers = [threading.Thread(target=lambda: nets.append(zoo.trained_fmnist_net(tmp_path / "c")))
               for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(calls) == 1 and len(nets) == 3
    for net in nets[1:]:
        assert net is not nets[0] and torch.equal(net[0].weight, nets[0][0].weight)
    cached = tmp_path / "c" / f"fmnist_{zoo.FMNIST_RECIPE}.pt"
    assert sorted(p.name for p in cached.parent.iterdir()) == sorted(
        [cached.name, f"fmnist_{zoo.FMNIST_RECIPE}.lock"])            # no temporary file left

    cached.write_bytes(b"half a file")
    net = zoo.trained_fmnist_net(tmp_path / "c")
    assert len(calls) == 2
    state = torch.load(cached, weights_only=True)
    assert torch.equal(state["0.weight"], net[0].weight)


@pytest.mark.parametrize("patch, stride", [(4, 2), (7, 3)])
def test_exact_equals_naive_on_real_images(con, test_set, patch, stride):
    images, labels = test_set
    for i in (0, 1):
        query = f"SELECT HEATMAP FROM img USING fmnist PATCH {patch} STRIDE {stride}"
        naive = con.execute(query + " NAIVE", img=images[i])
        exact = con.execute(query + " EXACT", img=images[i])
        assert naive.heatmap.shape == ((28 - patch) // stride + 1 + ((28 - patch) % stride > 0),) * 2
        assert naive.label_name == FASHION_MNIST_CLASSES[labels[i]]     # the net gets both right
        np.testing.assert_allclose(exact.heatmap, naive.heatmap, rtol=0, atol=1e-5)
        assert naive.heatmap.min() < 0.9 * naive.heatmap.max()         # occlusion matters somewhere


def test_label_by_class_name(con, test_set):
    images, _ = test_set
    r = con.execute("SELECT HEATMAP FROM img USING fmnist PATCH 4 STRIDE 4 LABEL 'ankle boot'",
                    img=images[0])
    assert r.label_name == "Ankle boot" and r.heatmap.shape == (7, 7)
