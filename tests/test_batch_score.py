"""`edgeserve batch score`: formats, column mapping, row errors, resume, and 1M rows."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from edgeserve.cli.group import run
from tests.serving import run_server
from tests.test_batch_support import digits_rows, model_repository, served_outputs, server_config
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_repository(tmp_path_factory.mktemp("repo"))


def score(repo: Path, *args: str) -> int:
    return run(
        ["batch", "score", "--model", "digits", "--repository", str(repo), "--no-progress", *args]
    )


def read_output(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".csv":
        return pacsv.read_csv(path)
    return pa.Table.from_pylist([json.loads(line) for line in path.read_text().splitlines()])


def expected_labels(repo: Path, x: np.ndarray) -> np.ndarray:
    from edgeserve.offline.model import load_model

    return load_model(repo, "digits").runtime.run({"input": x}, ["label"])["label"]


@pytest.mark.parametrize("out_suffix", [".csv", ".jsonl", ".parquet"])
def test_pixel_columns_map_by_prefix_into_every_output_format(
    repo: Path, tmp_path: Path, out_suffix: str
) -> None:
    x, _ = digits_rows()
    source = tmp_path / "digits.csv"
    pacsv.write_csv(pa.table({f"pixel_{i}": x[:, i] for i in range(64)}), source)
    output = tmp_path / f"scores{out_suffix}"
    assert (
        score(
            repo,
            str(source),
            "--output",
            str(output),
            "--map",
            "input=pixel_*",
            "--chunk-rows",
            "500",
        )
        == 0
    )
    table = read_output(output)
    assert table.column("row").to_pylist() == list(range(len(x)))
    assert np.array_equal(table.column("label").to_numpy(), expected_labels(repo, x))
    assert not (tmp_path / f"scores{out_suffix}.errors.jsonl").exists()


def test_a_list_column_named_like_the_input_needs_no_mapping(repo: Path, tmp_path: Path) -> None:
    x, _ = digits_rows()
    source = tmp_path / "digits.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "input": r.tolist()}) + "\n" for i, r in enumerate(x[:300]))
    )
    output = tmp_path / "scores.parquet"
    assert score(repo, str(source), "--output", str(output), "--keep", "id") == 0
    table = pq.read_table(output)
    assert table.column("id").to_pylist() == list(range(300))
    assert np.array_equal(table.column("label").to_numpy(), expected_labels(repo, x[:300]))


def test_bad_rows_go_to_the_errors_file_and_the_rest_is_scored(repo: Path, tmp_path: Path) -> None:
    x, _ = digits_rows()
    lines = [json.dumps({"input": r.tolist()}) for r in x[:50]]
    lines[3] = json.dumps({"input": x[3].tolist()[:10]})  # too short
    lines[7] = "{not json"
    lines[11] = json.dumps({"input": None})
    lines[20] = json.dumps({"input": ["a"] * 64})
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "scores.jsonl"
    assert score(repo, str(source), "--output", str(output), "--chunk-rows", "16") == 0
    rows = [json.loads(line)["row"] for line in output.read_text().splitlines()]
    errors = [
        json.loads(line)
        for line in (tmp_path / "scores.jsonl.errors.jsonl").read_text().splitlines()
    ]
    assert [e["row"] for e in errors] == [3, 7, 11, 20]
    assert sorted(rows + [e["row"] for e in errors]) == list(range(50))
    assert all(e["error"] for e in errors)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--map", "input=nope"], "no column 'nope'"),
        (["--map", "other=x"], "not an input of the model"),
        (["--keep", "ghost"], "--keep: no column 'ghost'"),
    ],
)
def test_mapping_mistakes_fail_before_scoring_with_a_clear_message(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    source = tmp_path / "in.csv"
    source.write_text(",".join(f"input_{i}" for i in range(64)) + "\n" + ",".join("1" * 64) + "\n")
    assert score(repo, str(source), "--output", str(tmp_path / "o.csv"), *args) == 1
    assert message in capsys.readouterr().err


def _write_digits_parquet(path: Path, rows: int, row_group: int = 50_000) -> None:
    """`rows` digits images (the 1797 real ones repeated) as one list column."""
    x, _ = digits_rows()
    writer = pq.ParquetWriter(path, pa.schema([("input", pa.list_(pa.float32(), 64))]))
    done = 0
    while done < rows:
        n = min(row_group, rows - done)
        idx = np.arange(done, done + n) % len(x)
        flat = pa.array(x[idx].reshape(-1))
        writer.write_table(pa.table({"input": pa.FixedSizeListArray.from_arrays(flat, 64)}))
        done += n
    writer.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeserve", "batch", "score", "--model", "digits", *args]


@pytest.mark.slow
def test_resume_after_sigkill_loses_and_repeats_no_row(repo: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.parquet"
    _write_digits_parquet(source, 200_000, row_group=7_000)
    output = tmp_path / "out.csv"
    args = _cli(
        str(source),
        "--output",
        str(output),
        "--repository",
        str(repo),
        "--chunk-rows",
        "1000",
        "--no-progress",
        "--threads",
        "1",
    )
    checkpoint = tmp_path / "out.csv.checkpoint.json"
    proc = subprocess.Popen(args)

    def midway_or_exited() -> bool:
        if proc.poll() is not None:
            return True  # the assertion below says it was not interrupted midway
        if not checkpoint.exists():
            return False
        return json.loads(checkpoint.read_text())["state"]["rows_done"] > 5000

    wait_until(midway_or_exited, 60, "5,000 rows checkpointed", interval_s=0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(checkpoint.read_text())["state"]["rows_done"]
    assert 0 < done < 200_000, "the run must be interrupted midway"
    assert subprocess.run([*args, "--resume"], timeout=120).returncode == 0
    rows = pacsv.read_csv(output).column("row").to_numpy()
    assert np.array_equal(rows, np.arange(200_000))
    assert not checkpoint.exists()


@pytest.mark.slow
def test_a_million_rows_match_the_servers_answers(repo: Path, tmp_path: Path) -> None:
    source = tmp_path / "million.parquet"
    _write_digits_parquet(source, 1_000_000)
    output = tmp_path / "scores.parquet"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(
        _cli(
            str(source),
            "--output",
            str(output),
            "--repository",
            str(repo),
            "--json",
            "--no-progress",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        f"batch rows/s={summary['rows_per_s']} peak_rss_mib={peak_kib / 1024:.0f} "
        f"(previous children peak {before / 1024:.0f})"
    )
    assert summary["scored"] == 1_000_000 and summary["failed"] == 0
    table = pq.read_table(output)
    assert table.num_rows == 1_000_000
    assert np.array_equal(table.column("row").to_numpy(), np.arange(1_000_000))
    sample = np.random.default_rng(8).choice(1_000_000, size=64, replace=False)
    x, _ = digits_rows()
    inputs = x[sample % len(x)]
    with run_server(tmp_path, config_text=server_config(repo)) as server:
        served = served_outputs(server.url, inputs)
    served_labels, served_probs = served["label"], served["probabilities"]
    picked = table.take(pa.array(sample))
    assert np.array_equal(picked.column("label").to_numpy(), served_labels)
    probs = np.stack(picked.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(probs, served_probs, rtol=1e-5, atol=1e-6)
    assert os.path.getsize(output) > 0


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("skip", [0, 1, 6, 7, 50, 99, 100])
def test_chunks_resume_exactly_after_the_skipped_rows(tmp_path: Path, fmt: str, skip: int) -> None:
    from edgeserve.offline.tables import read_chunks

    table = pa.table({"a": list(range(100))})
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        pacsv.write_csv(table, path)
    elif fmt == "parquet":
        pq.write_table(table, path, row_group_size=13)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    chunks = list(read_chunks(path, fmt, 7, skip))
    assert all(c.num_rows == 7 for c in chunks[:-1])
    values = [int(v) for c in chunks for v in c.column("a").to_pylist()]
    assert values == list(range(skip, 100))


def test_a_leftover_checkpoint_needs_resume_or_removal(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    x, _ = digits_rows()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"input": r.tolist()}) + "\n" for r in x[:10]))
    output = tmp_path / "out.jsonl"
    from edgeserve.offline.model import load_model
    from edgeserve.offline.run import FileCheckpoint, RunState

    version = load_model(repo, "digits").version
    FileCheckpoint.for_output(output, source, "digits", version).save(RunState())
    assert score(repo, str(source), "--output", str(output)) == 1
    assert "--resume" in capsys.readouterr().err
    assert score(repo, str(source), "--output", str(output), "--resume") == 0
    assert len(output.read_text().splitlines()) == 10


def _labelled_csv(path: Path, rows: int) -> None:
    x, y = digits_rows()
    header = ",".join([*(f"input_{i}" for i in range(64)), "label"])
    lines = [",".join([*(str(v) for v in x[i]), str(y[i])]) for i in range(rows)]
    path.write_text(header + "\n" + "\n".join(lines) + "\n")


def test_keeping_a_column_named_like_an_output_is_refused_naming_it(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--keep label` used to overwrite the user's ground truth with the prediction."""
    source = tmp_path / "in.csv"
    _labelled_csv(source, 20)
    output = tmp_path / "o.csv"
    assert score(repo, str(source), "--output", str(output), "--keep", "label") == 1
    err = capsys.readouterr().err
    assert "column 'label'" in err and "--output-prefix" in err
    assert not output.exists()
    args = ["--keep", "label", "--output-prefix", "pred_"]
    assert score(repo, str(source), "--output", str(output), *args) == 0
    table = read_output(output)
    x, y = digits_rows()
    assert table.column("label").to_pylist() == y[:20].tolist()
    assert table.column("pred_label").to_pylist() == expected_labels(repo, x[:20]).tolist()


def test_scoring_without_tqdm_works_and_leaves_nothing_behind(repo: Path, tmp_path: Path) -> None:
    """Only `[spark]` installed (pyarrow, no tqdm): the command still scores."""
    source = tmp_path / "in.csv"
    _labelled_csv(source, 20)
    output = tmp_path / "out.parquet"
    script = (
        "import sys; sys.modules['tqdm'] = None\n"  # as if tqdm were not installed
        "from edgeserve.cli.group import run\n"
        f"sys.exit(run(['batch', 'score', '--model', 'digits', '--repository', {str(repo)!r}, "
        f"{str(source)!r}, '--output', {str(output)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "backend=" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.parquet"]
