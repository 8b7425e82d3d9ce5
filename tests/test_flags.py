"""Every ``--flag`` that an error message, a help text or the docs tell a user to type exists,
and every ``python jobs/...`` command of the docs parses.

A message that names a flag the jobs do not have sends the user to a second error; these tests
collect the options of every job (and of the bench scripts, for the docs) and check every flag
written in the code's string literals, the README and docs/ against them, then run each
documented command's arguments through its job's parser.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "jobs") not in sys.path:  # the jobs' own modules (demo, prepare, report...)
    sys.path.insert(0, str(REPO / "jobs"))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w-])")

# Flags of other programs that the code and docs quote: ray (job submit, start), git, pip,
# pytest-xdist, sort, tensorboard.
FOREIGN = {"--address", "--working-dir", "--runtime-env", "--runtime-env-json", "--no-wait",
           "--head", "--port", "--porcelain", "--untracked-files", "--quiet", "--upgrade",
           "--dist", "--sort", "--logdir"}


def _parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags: set[str] = set()
    for action in parser._actions:
        flags.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _parser_flags(sub)
    return flags


def job_flags() -> set[str]:
    """The options of jobs/teacher.py, student.py, pseudo_label.py, report.py, prepare.py and
    demo.py, plus what parse_config adds (--preset) and every parser has (--help)."""
    import demo
    import prepare
    from pseudo_label import PseudoLabelJob
    from report import ReportConfig

    from pipeline.config import StudentConfig, TrainConfig

    flags = {"--help", "--preset"}
    for cls in (TrainConfig, StudentConfig, PseudoLabelJob, ReportConfig):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            flags.add(flag)
            if f.type in (bool, "bool"):  # tyro's negation of a boolean
                flags.add("--no-" + flag[2:])
    return flags | _parser_flags(prepare.build_parser()) | _parser_flags(demo.build_parser())


def bench_flags() -> set[str]:
    """Options the bench scripts define (they build their parsers inside main)."""
    pattern = re.compile(r"add_argument\(\s*\"(--[a-z0-9-]+)\"")
    return {m for p in (REPO / "bench").glob("*.py") for m in pattern.findall(p.read_text())}


def code_flags() -> dict[str, list[str]]:
    """Flags in the string literals of pipeline/, models/ and jobs/ (messages, help, docstrings)."""
    found: dict[str, list[str]] = {}
    for folder in ("pipeline", "models", "jobs"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    for flag in FLAG.findall(node.value):
                        found.setdefault(flag, []).append(
                            f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def doc_flags() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for flag in FLAG.findall(line):
                found.setdefault(flag, []).append(f"{path.relative_to(REPO)}:{i}")
    return found


def test_the_flag_pattern_finds_flags_and_skips_what_is_not_one() -> None:
    text = ('lower --label-actors or --cpus-per-actor; "--no-{name}"; official --train_ratio=2; '
            "x--y; --lr 0.1 and --k.")
    assert FLAG.findall(text) == ["--label-actors", "--cpus-per-actor", "--lr", "--k"]


def test_job_flags_are_collected_from_every_job() -> None:
    flags = job_flags()
    # One of each source: a TrainConfig field, a tyro negation, the pseudo-label job's own
    # field, the report's, prepare's subcommands, the demo's parser.
    assert {"--epochs", "--no-soft-labels", "--num-cpus", "--format", "--labeled-fraction",
            "--classes", "--rounds"} <= flags
    assert "--num-actors" not in flags


def test_every_flag_the_code_names_exists() -> None:
    known = job_flags() | FOREIGN
    unknown = {f: where for f, where in code_flags().items() if f not in known}
    assert not unknown, f"flags named in the code that no job has: {unknown}"


def test_every_flag_the_docs_name_exists() -> None:
    known = job_flags() | bench_flags() | FOREIGN
    unknown = {f: where for f, where in doc_flags().items() if f not in known}
    assert not unknown, f"flags named in README.md or docs/ that nothing has: {unknown}"


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """Every ``python jobs/<job>.py ...`` in README.md and docs/: (where, job, arguments). A
    command goes on over lines ending in a backslash and over following lines that start with
    an option (YAML's folded strings); it ends at a backtick or a comment. A lone capital letter
    (``--seed S``, ``--train-resolution R``) is a placeholder for a number."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.search(r"python jobs/(\w+)\.py\b(.*)", lines[i])
            if m:
                text, j = m.group(2), i
                while j + 1 < len(lines) and (text.rstrip().endswith("\\")
                                              or lines[j + 1].strip().startswith("--")):
                    text = text.rstrip().rstrip("\\") + " " + lines[j + 1].strip()
                    j += 1
                text = text.split("`")[0].split("#")[0]
                args = ["0" if re.fullmatch(r"[A-Z]", a) else a for a in shlex.split(text)]
                found.append((f"{path.relative_to(REPO)}:{i + 1}", m.group(1), args))
                i = j
            i += 1
    return found


def parse_job_args(job: str, args: list[str]) -> object:
    """The job's own parser, without running it."""
    import demo
    import prepare
    import pseudo_label
    import report

    from pipeline.config import StudentConfig, TrainConfig, parse_config

    parsers = {"teacher": lambda a: parse_config(TrainConfig, "teacher", a),
               "student": lambda a: parse_config(StudentConfig, "student", a),
               "pseudo_label": pseudo_label.parse_args, "report": report.parse_args,
               "prepare": lambda a: prepare.build_parser().parse_args(a),
               "demo": lambda a: demo.build_parser().parse_args(a)}
    return parsers[job](args)


def test_every_command_in_the_docs_parses() -> None:
    import contextlib
    import io

    commands = doc_commands()
    assert {job for _, job, _ in commands} >= {"teacher", "student", "pseudo_label", "report",
                                               "prepare", "demo"}
    failed = []
    for where, job, args in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parse_job_args(job, args)
        except (SystemExit, Exception) as e:  # tyro and argparse exit; our checks raise
            failed.append(f"{where}: jobs/{job}.py {' '.join(args)}: {e!r} "
                          f"{' '.join(err.getvalue().split())[:300]}")
    assert not failed, "\n".join(failed)


def test_a_command_with_a_missing_value_fails_the_check() -> None:
    """What the check above caught in docs/cluster.md: a bare --use-gpu (it takes a value)."""
    import contextlib
    import io

    import pytest

    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parse_job_args("teacher", ["--run", "r", "--data", "d", "--use-gpu"])
    assert parse_job_args("teacher", ["--run", "r", "--data", "d", "--use-gpu", "True"])


def test_every_job_takes_its_plain_booleans_as_switches() -> None:
    """``--flag`` and ``--no-flag`` for every plain bool option, in each job's own parser: the
    README gives them that way for every job (pseudo_label.py once wanted ``--flag False``)."""
    import dataclasses as dc

    import pseudo_label
    import report

    from pipeline.config import StudentConfig, TrainConfig

    jobs = {"teacher": (TrainConfig, ["--run", "r", "--data", "d"]),
            "student": (StudentConfig, ["--run", "r"]),
            "pseudo_label": (pseudo_label.PseudoLabelJob, ["--run", "r"]),
            "report": (report.ReportConfig, ["--run", "r"])}
    tried = 0
    for job, (cls, base) in jobs.items():
        for f in dc.fields(cls):
            if f.type in (bool, "bool"):
                flag = f.name.replace("_", "-")
                assert getattr(parse_job_args(job, [*base, f"--{flag}"]), f.name) is True, flag
                assert getattr(parse_job_args(job, [*base, f"--no-{flag}"]), f.name) is False
                tried += 1
    assert tried >= 10


def test_every_job_names_its_options_in_one_line_for_an_unknown_one() -> None:
    import pytest

    from pipeline.config import ConfigError

    for job, base, example in (("teacher", ["--data", "d"], "--epochs"),
                               ("student", [], "--round"),
                               ("pseudo_label", [], "--label-actors"),
                               ("report", [], "--format")):
        with pytest.raises(ConfigError) as e:
            parse_job_args(job, ["--run", "r", *base, "--no-such-option", "1"])
        assert str(e.value).startswith("unknown option --no-such-option; allowed: "), job
        assert example in str(e.value) and "\n" not in str(e.value), job


def test_no_plain_switch_is_documented_with_a_value() -> None:
    """The jobs' plain bool options are switches (``--flag`` / ``--no-flag``): a ``--flag
    False`` in a message or the docs is refused by the parser with "Unrecognized options"."""
    from pipeline.config import PseudoLabelConfig, StudentConfig, TrainConfig

    switches = {"--" + f.name.replace("_", "-")
                for cls in (TrainConfig, StudentConfig, PseudoLabelConfig)
                for f in dataclasses.fields(cls) if f.type in ("bool", bool)}
    assert "--jpeg-dct-scaling" in switches and "--flip" in switches
    with_value = re.compile(r"(--[a-z][a-z0-9-]*)[ =](True|False)\b")
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "pipeline").rglob("*.py")), *sorted((REPO / "jobs").rglob("*.py"))]
    wrong = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in texts
             for m in with_value.finditer(p.read_text()) if m.group(1) in switches]
    assert not wrong, wrong


def test_every_test_the_docs_name_exists() -> None:
    """docs/bad_input.md backs each row with a test by name (``tests/x.py::test_y``), as do the
    README and the other docs: a renamed or removed test must not leave a row unbacked."""
    cited = [(md.name, f, name)
             for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
             for f, name in re.findall(r"tests/(\w+\.py)::(\w+)", md.read_text())]
    assert len(cited) > 50
    missing = [c for c in cited
               if not re.search(rf"^def {c[2]}\(", (REPO / "tests" / c[1]).read_text(), re.M)]
    assert not missing, missing


def test_every_argparse_option_with_a_default_says_it_in_its_help() -> None:
    """docs/README.md: `--help` of every job lists its options with their defaults. The tyro
    jobs print them by themselves; prepare's and demo's argparse help strings must say them."""
    import demo
    import prepare

    def parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        out = [p]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    out += parsers(sub)
        return out

    silent = []
    for parser in [*parsers(prepare.build_parser()), *parsers(demo.build_parser())]:
        for a in parser._actions:
            if not a.option_strings or a.required or a.help in (None, argparse.SUPPRESS):
                continue
            if a.default not in (None, argparse.SUPPRESS) and "default" not in a.help:
                silent.append(f"{parser.prog} {a.option_strings[-1]}")
    assert not silent


def test_student_help_says_what_its_seed_draws_and_that_model_takes_next(capsys) -> None:
    """StudentConfig inherits --seed from both configs: its help was the training one, which
    leaves out the selection's draws; --model next (the demo preset's) was not in --help."""
    import pytest

    with pytest.raises(SystemExit):
        parse_job_args("student", ["--help"])
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "selection's per-row draws" in text and "'next' for the next size" in text
