"""tools/eval_corruptions.py on tiny CIFAR-10-C and ImageNet-C folders, against independent references."""
import csv
import json
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import models
from utils.data import dataset_info

import tools.eval_corruptions as ec

PER_SEVERITY = 4  # images per severity in the tiny CIFAR-10-C files
CORRUPTIONS = ("fog", "gaussian_noise")
MODEL = "resnet20_1w1a"


pytestmark = pytest.mark.usefixtures("one_thread")


def _training_checkpoint(model, num_classes):
    return {"format_version": 1, "model": MODEL, "num_classes": num_classes, "state_dict": model.state_dict(),
            "epoch": 1, "optimizer": {}, "scheduler": {}, "scaler": None, "extra": {}, "best_top1": 0.0,
            "best_top5": 0.0, "history": [], "args": {}, "rng": {}}


def _reference_predictions(model, images_nhwc, dataset="cifar10"):
    """Predictions computed image by image through torchvision's ToTensor + Normalize."""
    info = dataset_info(dataset)
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info["mean"], info["std"])])
    batch = torch.stack([to_input(image) for image in images_nhwc])
    with torch.no_grad():
        return model.eval()(batch).argmax(dim=1).numpy()


@pytest.fixture(scope="module")
def cifar_c(tmp_path_factory):
    """Tiny CIFAR-10-C folder (severity s exactly min(s, 4) / 4 right), both checkpoints, predictions."""
    root = tmp_path_factory.mktemp("cifar10c")
    torch.manual_seed(0)
    model = models.create_model(MODEL, num_classes=10).eval()
    rng = np.random.default_rng(0)
    data = root / "CIFAR-10-C"
    data.mkdir()
    images = {}
    labels = np.zeros(5 * PER_SEVERITY, dtype=np.uint8)
    preds = {}
    for name in CORRUPTIONS:
        images[name] = rng.integers(0, 256, size=(5 * PER_SEVERITY, 32, 32, 3), dtype=np.uint8)
        np.save(data / f"{name}.npy", images[name])
        preds[name] = _reference_predictions(model, images[name])
    # Labels come from the first corruption's predictions: in severity s the first min(s, 4) rows
    # are right, so a wrong row-to-severity split cannot go unnoticed.
    for row, pred in enumerate(preds[CORRUPTIONS[0]]):
        right = row % PER_SEVERITY < row // PER_SEVERITY + 1
        labels[row] = pred if right else (pred + 1) % 10
    np.save(data / "labels.npy", labels)
    ckpt = root / "model_best.pth.tar"
    torch.save(_training_checkpoint(model, 10), ckpt)
    bare = root / "bare.pth"
    torch.save(model.state_dict(), bare)
    return {"data": data, "ckpt": ckpt, "bare": bare, "model": model, "images": images, "labels": labels,
            "preds": preds, "root": root}


def _run(*argv):
    return ec.main([*map(str, argv), "--gpus", "cpu"])


BASE_ERRORS = {"fog": [50.0, 60.0, 70.0, 80.0, 90.0], "gaussian_noise": [40.0, 45.0, 50.0, 55.0, 95.0]}
BASE_CLEAN, OUR_CLEAN = 30.0, 20.0


@pytest.fixture(scope="module")
def cifar_run(cifar_c):
    """One run of the tool on the tiny CIFAR-10-C against a hand-written baseline JSON."""
    baseline = cifar_c["root"] / "alexnet.json"
    baseline.write_text(json.dumps({"corruptions": {c: {"error": e} for c, e in BASE_ERRORS.items()},
                                    "clean_error": BASE_CLEAN}))
    out = cifar_c["root"] / "out" / "r.json"
    results = _run("--dataset", "cifar10", "--data_path", cifar_c["data"], "--checkpoint", cifar_c["ckpt"],
                   "--baseline", baseline, "--clean_error", OUR_CLEAN, "--out", out)
    return results, out


def test_cifar_accuracy_per_severity_matches_reference(cifar_c, cifar_run):
    results, out = cifar_run
    assert list(results["corruptions"]) == sorted(CORRUPTIONS)
    assert results["model"] == MODEL and results["num_classes"] == 10
    first = results["corruptions"][CORRUPTIONS[0]]
    assert first["accuracy"] == [100.0 * min(s, PER_SEVERITY) / PER_SEVERITY for s in range(1, 6)]
    for name in CORRUPTIONS:
        row = results["corruptions"][name]
        right = cifar_c["preds"][name] == cifar_c["labels"]
        expected = [int(right[(s - 1) * PER_SEVERITY:s * PER_SEVERITY].sum()) for s in range(1, 6)]
        assert row["correct"] == expected
        assert row["count"] == [PER_SEVERITY] * 5
        assert row["accuracy"] == [100.0 * c / PER_SEVERITY for c in expected]
        assert row["mean_accuracy"] == pytest.approx(sum(row["accuracy"]) / 5)
    means = [r["mean_accuracy"] for r in results["corruptions"].values()]
    assert results["mean_accuracy"] == pytest.approx(sum(means) / len(means))
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = list(csv.reader(open(out.with_suffix(".csv"))))
    assert rows[0][:2] == ["corruption", "acc_s1"] and [r[0] for r in rows[1:]] == [*sorted(CORRUPTIONS), "mean"]
    assert float(rows[1][1]) == pytest.approx(first["accuracy"][0])
    assert float(rows[-1][-2]) == pytest.approx(results["mce"], abs=1e-4)


def test_mce_and_relative_mce_from_two_jsons(cifar_run):
    results = json.loads(cifar_run[1].read_text())
    ce, rel = {}, {}
    for c, theirs in BASE_ERRORS.items():
        ours = [100.0 - a for a in results["corruptions"][c]["accuracy"]]
        ce[c] = 100.0 * sum(ours) / sum(theirs)
        rel[c] = 100.0 * sum(e - OUR_CLEAN for e in ours) / sum(e - BASE_CLEAN for e in theirs)
    assert results["ce"] == pytest.approx(ce) and results["relative_ce"] == pytest.approx(rel)
    assert results["mce"] == pytest.approx(sum(ce.values()) / 2)
    assert results["relative_mce"] == pytest.approx(sum(rel.values()) / 2)
    assert results["clean_error"] == OUR_CLEAN


def test_bare_state_dict_shared_labels_and_default_output(cifar_c, tmp_path):
    """10,000-label copies: one label block serves all five severities; output goes next to the weights."""
    data = tmp_path / "c10c"
    data.mkdir()
    np.save(data / "fog.npy", cifar_c["images"]["fog"])
    shared = np.arange(PER_SEVERITY, dtype=np.int64) % 10
    np.save(data / "labels.npy", shared)
    bare = tmp_path / "weights.pth"
    bare.write_bytes(cifar_c["bare"].read_bytes())
    results = _run("--dataset", "cifar10", "--data_path", data, "--checkpoint", bare, "--model", MODEL,
                   "--corruptions", "fog", "--batch_size", 3)
    preds = cifar_c["preds"]["fog"]
    expected = [int((preds[(s - 1) * PER_SEVERITY:s * PER_SEVERITY] == shared).sum()) for s in range(1, 6)]
    assert results["corruptions"]["fog"]["correct"] == expected
    assert (tmp_path / "weights_corruptions_cifar10.json").is_file()
    assert (tmp_path / "weights_corruptions_cifar10.csv").is_file()


def test_corruption_errors_by_hand():
    ours = {"corruptions": {"a": {"error": [10, 20, 30, 40, 50]}, "b": {"error": [5, 5, 5, 5, 5]}},
            "clean_error": 5.0}
    base = {"corruptions": {"a": {"error": [20, 40, 60, 80, 100]}, "b": {"error": [10, 10, 10, 10, 10]},
                            "c": {"error": [1, 1, 1, 1, 1]}}, "clean_error": 8.0}
    got = ec.corruption_errors(ours, base)
    assert got["ce"] == pytest.approx({"a": 50.0, "b": 50.0})
    assert got["mce"] == pytest.approx(50.0)
    # a: (150 - 5 * 5) / (300 - 5 * 8) = 125 / 260; b: (25 - 25) / (50 - 40) = 0
    assert got["relative_ce"] == pytest.approx({"a": 100.0 * 125 / 260, "b": 0.0})
    assert got["relative_mce"] == pytest.approx(50.0 * 125 / 260)
    assert ec.corruption_errors(ours, {"corruptions": base["corruptions"]})["relative_mce"] is None
    with pytest.raises(ec.CorruptionError, match="relative CE is undefined"):
        ec.corruption_errors(ours, {**base, "clean_error": 10.0})


@pytest.fixture(scope="module")
def imagenet_c(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenetc")
    rng = np.random.default_rng(1)
    for corruption in ("contrast", "shot_noise"):
        for severity in range(1, 6):
            for cls in ("n01", "n02"):
                folder = root / "ImageNet-C" / corruption / str(severity) / cls
                folder.mkdir(parents=True)
                pixels = rng.integers(0, 256, size=(40, 44, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / "img.JPEG", quality=90)
    torch.manual_seed(1)
    model = models.create_model(MODEL, num_classes=2).eval()
    ckpt = root / "ckpt.pth.tar"
    torch.save(_training_checkpoint(model, 2), ckpt)
    return {"data": root / "ImageNet-C", "ckpt": ckpt, "model": model, "root": root}


def test_imagenet_c_layout_and_hendrycks_preprocessing(imagenet_c, tmp_path):
    out = tmp_path / "inc.json"
    results = _run("--dataset", "imagenet", "--data_path", imagenet_c["data"], "--checkpoint", imagenet_c["ckpt"],
                   "--image_size", 32, "--workers", 0, "--out", out, "--corruptions", "shot_noise,contrast")
    assert list(results["corruptions"]) == ["shot_noise", "contrast"]
    # Hendrycks and Dietterich's ImageNet-C evaluation: the stored images are 224 x 224 already, so
    # CenterCrop(224), ToTensor, Normalize with ImageNet's statistics, and no Resize(256) first
    # (the crop is 32 here, the images 40 x 44)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    to_input = transforms.Compose([transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize(mean, std)])
    for corruption, row in results["corruptions"].items():
        assert row["count"] == [2] * 5
        for severity in range(1, 6):
            folder = imagenet_c["data"] / corruption / str(severity)
            batch = torch.stack([to_input(Image.open(folder / cls / "img.JPEG").convert("RGB"))
                                 for cls in ("n01", "n02")])
            with torch.no_grad():
                preds = imagenet_c["model"](batch).argmax(dim=1)
            assert row["correct"][severity - 1] == int((preds == torch.tensor([0, 1])).sum())
    assert out.is_file() and (tmp_path / "inc.csv").is_file()
    assert len(list(csv.reader(open(tmp_path / "inc.csv")))) == 4


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """An (untrained) digits checkpoint as the training script writes it: its dataset is digits."""
    root = tmp_path_factory.mktemp("digitsc")
    torch.manual_seed(2)
    model = models.create_model(MODEL, num_classes=10).eval()
    state = _training_checkpoint(model, 10)
    state["args"] = {"dataset": "digits"}
    torch.save(state, root / "model_best.pth.tar")
    return root / "model_best.pth.tar"


@pytest.mark.slow(reason="evaluates one digits-C family (2,250 images) twice in subprocesses and once here: "
                        "about 13 s; the corruptions' determinism and severity order are checked in the "
                        "default set (test_corruptions.py)")
def test_digits_c_needs_no_data_and_writes_the_same_records(digits_checkpoint):
    from utils.corruptions import FAMILIES, digits_c
    results = _run("--checkpoint", digits_checkpoint, "--corruptions", "contrast")
    assert results["dataset"] == "digits" and list(results["corruptions"]) == ["contrast"]
    model = models.create_model(MODEL, num_classes=10)
    model.load_state_dict(torch.load(digits_checkpoint, weights_only=True)["state_dict"])
    model.eval()
    for family, row in results["corruptions"].items():
        assert family in FAMILIES and row["count"] == [450] * 5
        for severity in range(1, 6):
            images, labels = digits_c(family, severity)
            with torch.no_grad():
                correct = int((model(images).argmax(dim=1) == labels).sum())
            assert row["correct"][severity - 1] == correct
    # the clean error comes from the clean test split, so relative CE needs no --clean_error
    assert 0 <= results["clean_error"] <= 100
    out = digits_checkpoint.parent / "model_best_corruptions_digits.json"
    assert json.loads(out.read_text())["format"] == "lcr-bnn-corruptions"
    assert (digits_checkpoint.parent / "model_best_corruptions_digits.csv").is_file()
    curve = digits_checkpoint.parent / "curve.png"
    again = _run("--checkpoint", digits_checkpoint, "--corruptions", "contrast", "--plot", curve)
    assert again["corruptions"] == results["corruptions"]      # deterministic, and its own file is replaced
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _blank(n_images, side=32):
    return np.zeros((n_images, side, side, 3), dtype=np.uint8)


def _bad_cases(cifar_c, imagenet_c, tmp):
    """name -> (argv, a fragment of the error line)."""
    ok = ["--dataset", "cifar10", "--checkpoint", cifar_c["ckpt"]]
    folders = {}
    for name in ("no_labels", "shape", "not_mult5", "label_len", "label_range"):
        folders[name] = tmp / name
        folders[name].mkdir()
    np.save(folders["no_labels"] / "fog.npy", _blank(10))
    np.save(folders["shape"] / "fog.npy", _blank(10, side=16))
    np.save(folders["shape"] / "labels.npy", np.zeros(10, dtype=np.uint8))
    np.save(folders["not_mult5"] / "fog.npy", _blank(12))
    np.save(folders["not_mult5"] / "labels.npy", np.zeros(12, dtype=np.uint8))
    np.save(folders["label_len"] / "fog.npy", _blank(10))
    np.save(folders["label_len"] / "labels.npy", np.zeros(7, dtype=np.uint8))
    np.save(folders["label_range"] / "fog.npy", _blank(10))
    np.save(folders["label_range"] / "labels.npy", np.full(10, 10, dtype=np.uint8))
    torn = tmp / "torn.pth.tar"
    torn.write_bytes(cifar_c["ckpt"].read_bytes()[:200])
    no_base = tmp / "base.json"
    no_base.write_text(json.dumps({"corruptions": {"fog": {"error": [1, 2, 3, 4, 5]}}}))
    inc = tmp / "inc"
    (inc / "blur" / "1" / "n01").mkdir(parents=True)
    data = cifar_c["data"]
    return {
        "missing_folder": ([*ok, "--data_path", tmp / "nowhere"], "does not exist"),
        "missing_labels": ([*ok, "--data_path", folders["no_labels"]], "labels.npy is missing"),
        "shape_mismatch": ([*ok, "--data_path", folders["shape"]], "expected uint8 N x 32 x 32 x 3"),
        "not_multiple_of_5": ([*ok, "--data_path", folders["not_mult5"]], "not a positive multiple of 5"),
        "label_count": ([*ok, "--data_path", folders["label_len"]], "has 7 labels"),
        "label_range": ([*ok, "--data_path", folders["label_range"]], "labels 10..10"),
        "unknown_corruption": ([*ok, "--data_path", data, "--corruptions", "snow"], "snow not found"),
        "missing_checkpoint": (["--dataset", "cifar10", "--data_path", data, "--checkpoint", tmp / "x.pth"],
                               "does not exist"),
        "torn_checkpoint": (["--dataset", "cifar10", "--data_path", data, "--checkpoint", torn], "corrupt"),
        "bare_without_model": (["--data_path", data, "--checkpoint", cifar_c["bare"]], "bare state dict"),
        "wrong_model": ([*ok, "--data_path", data, "--model", "vgg_small_1w1a"], "is of model"),
        "baseline_lacks_corruption": ([*ok, "--data_path", data, "--baseline", no_base], "gaussian_noise"),
        "missing_severity": (["--dataset", "imagenet", "--data_path", inc, "--checkpoint", imagenet_c["ckpt"]],
                             "severity folder"),
    }


def test_bad_inputs_one_error_line_exit_1(cifar_c, imagenet_c, tmp_path, capsys):
    for name, (argv, fragment) in _bad_cases(cifar_c, imagenet_c, tmp_path).items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            _run(*argv)
        err = capsys.readouterr().err
        assert info.value.code == 1, name
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, (name, err)


def test_script_entry_point_exits_1(tmp_path, monkeypatch, capsys):
    """``python -m tools.eval_corruptions ...`` with bad input: exit status 1, one error line."""
    monkeypatch.setattr(sys, "argv", ["eval_corruptions", "--dataset", "cifar10", "--data_path", str(tmp_path / "none"),
                                      "--checkpoint", str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit) as info:
        # as `python -m` does: a fresh module executed as __main__, not the imported one
        monkeypatch.delitem(sys.modules, "tools.eval_corruptions")
        runpy.run_module("tools.eval_corruptions", run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1
