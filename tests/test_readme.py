"""The documentation runs as typed: README.md's command blocks in sequence, every command in docs/ parsed.

README.md's ```bash blocks are the user's path (install, quick start, evaluate, export, paper
table, tensorboard, benchmarks). The slow test runs them, in order, in a fresh copy of the tracked
files, with the substitutions below that make them tiny (each must apply, so the README cannot drift
away from them unnoticed). A block preceded by ``<!-- readme-test: skip: REASON -->`` is skipped
(installing packages, data that cannot be downloaded here, the test suite itself). The fast test
parses every ``python cifar/main.py``, ``imagenet/main.py`` and ``python -m tools.X`` command of
README.md and docs/*.md with the parser of the script or tool it names, so a renamed or removed
flag breaks it.
"""
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, script_env

BLOCK = re.compile(r"(<!--\s*readme-test:\s*skip:(?P<reason>[^>]*)-->\s*\n)?```bash\n(?P<body>.*?)```", re.S)
# (what the README says, what the test runs instead): tiny settings, and tensorboard inspecting
# the run folders instead of serving them
SUBSTITUTIONS = [
    ("--epochs 15", "--epochs 1"),
    ("--checkpoint results/resnet20_1w1a/model_best.pth.tar", "--checkpoint results/resnet20_1w1a/model_best.pth.tar "
                                                              "--corruptions contrast"),
    ("tensorboard --logdir results", "tensorboard --inspect --logdir results"),
    ("--steps 2 --rounds 10 --warmup 2", "--steps 1 --rounds 1 --warmup 0"),
    ("-j 0 2 --rounds 2", "-j 0 --rounds 1 --batches 2"),
]
README_TIMEOUT_S = 900


def bash_blocks(path):
    """``(commands, skip reason or None)`` of every ```bash block of a Markdown file."""
    text = Path(path).read_text()
    return [(m.group("body"), (m.group("reason") or "").strip() or None) for m in BLOCK.finditer(text)]


def command_lines(body):
    """The commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = body.replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.slow(reason="runs the README's whole user path (training, evaluation, export, tools): about 2 minutes")
def test_readme_commands_run_in_sequence_as_typed(tmp_path):
    copy = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (REPO_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, copy / name)
    used = set()
    ran = 0
    for body, skip in bash_blocks(REPO_ROOT / "README.md"):
        if skip:
            continue
        for original, tiny in SUBSTITUTIONS:
            if original in body:
                body, _ = body.replace(original, tiny), used.add(original)
        result = subprocess.run(["bash", "-e", "-c", body], cwd=copy, env=script_env(), capture_output=True,
                                text=True, timeout=README_TIMEOUT_S)
        assert result.returncode == 0, f"README block failed:\n{body}\n--- stdout\n{result.stdout[-3000:]}" \
                                       f"\n--- stderr\n{result.stderr[-3000:]}"
        ran += 1
    assert ran >= 4
    assert used == {original for original, _ in SUBSTITUTIONS}, "a substitution no longer matches the README"


def _parsers():
    from tools import (ablate_alpha, bench, bench_loader, bench_tricks, chain_stats, epoch_curves, eval_corruptions,
                       export, lcr_power_error)
    from utils import options

    def training(defaults):
        def parse(argv):
            parser = options.get_args_parser(defaults, "t")
            return options.validate_args(parser, options.apply_defaults(parser.parse_args(argv), defaults))
        return parse

    def tool_parser(make):
        return lambda argv: make().parse_args(argv)

    return {
        "cifar/main.py": training(options.CIFAR_DEFAULTS),
        "imagenet/main.py": training(options.IMAGENET_DEFAULTS),
        "tools.ablate_alpha": lambda argv: (ablate_alpha.get_args_parser().parse_args(ablate_alpha.split_argv(argv)[0]),
                                            training(options.CIFAR_DEFAULTS)(ablate_alpha.split_argv(argv)[1])),
        "tools.bench": tool_parser(bench.get_parser), "tools.bench_loader": tool_parser(bench_loader.get_parser),
        "tools.draw_pipeline": None, "tools.eval_corruptions": tool_parser(eval_corruptions.get_args_parser),
        "tools.epoch_curves": tool_parser(epoch_curves.get_args_parser),
        "tools.bench_tricks": tool_parser(bench_tricks.get_args_parser),
        "tools.chain_stats": tool_parser(chain_stats.get_args_parser),
        "tools.export": tool_parser(export.get_args_parser), "tools.lcr_power_error":
            tool_parser(lcr_power_error.get_args_parser), "tools.summary": None, "tools.paper_table": None,
    }


def _documented_commands():
    files = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    for path in files:
        for body, _ in bash_blocks(path):
            for line in command_lines(body):
                folder = ""
                for part in line.split("&&"):
                    words = shlex.split(part)
                    if words[:1] == ["cd"]:
                        folder = words[1].rstrip("/") + "/"
                    elif words[:1] == ["python"] and len(words) > 1:
                        target = words[2] if words[1] == "-m" else folder + words[1]
                        yield path.name, target, words[3:] if words[1] == "-m" else words[2:]
                    elif words[:1] == ["torchrun"]:
                        script = next(w for w in words if w.endswith("main.py"))
                        yield path.name, script, words[words.index(script) + 1:]


def test_every_documented_command_parses_with_its_own_parser():
    parsers = _parsers()
    checked = 0
    for doc, target, argv in _documented_commands():
        if target in ("-m", "pytest") or target.startswith("pytest"):
            continue
        assert target in parsers, f"{doc}: unknown command {target}"
        if parsers[target] is None:
            continue
        parsers[target]([a for a in argv if a != "..."])
        checked += 1
    assert checked >= 15
