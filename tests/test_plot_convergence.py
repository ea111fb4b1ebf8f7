"""docs/plot_convergence.py: curves come from the runs' metric files (a re-measured tick replaces the old point),
levels from the demo's fid-<name>.json, and both figure and JSON are written."""
import importlib.util
import json
from pathlib import Path

from click.testing import CliRunner

SCRIPT = Path(__file__).resolve().parents[1] / 'docs' / 'plot_convergence.py'
spec = importlib.util.spec_from_file_location('plot_convergence', SCRIPT)
plot_convergence = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_convergence)


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def test_curves_levels_and_files(tmp_path):
    write_jsonl(tmp_path / 'a' / 'metric-fid300.jsonl', [dict(kimg=0.4, fid=300.0), dict(kimg=0.8, fid=250.0),
                                                         dict(kimg=0.8, fid=240.0)])  # resumed: 0.8 measured again
    write_jsonl(tmp_path / 'b' / 'metric-fid300.jsonl', [dict(kimg=1.0, fid=150.5)])
    (tmp_path / 'fid-teacher.json').write_text(json.dumps(dict(fid=261.25)))
    out_json, out_png = tmp_path / 'c.json', tmp_path / 'c.png'
    result = CliRunner().invoke(plot_convergence.main, [
        f'--run=A={tmp_path / "a"}', f'--run=B={tmp_path / "b"}', f'--level=teacher={tmp_path / "fid-teacher.json"}',
        '--start=350', '--title=t', f'--json={out_json}', f'--png={out_png}'])
    assert result.exit_code == 0, result.output
    record = json.loads(out_json.read_text())
    assert record['curves']['A'] == [dict(images=0, fid=350.0), dict(images=400, fid=300.0),
                                     dict(images=800, fid=240.0)]
    assert record['curves']['B'] == [dict(images=0, fid=350.0), dict(images=1000, fid=150.5)]
    assert record['levels'] == {'teacher': 261.25}
    assert out_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_bad_run_spec_and_missing_metrics(tmp_path):
    runner = CliRunner()
    args = ['--title=t', f'--json={tmp_path / "x.json"}', f'--png={tmp_path / "x.png"}']
    result = runner.invoke(plot_convergence.main, ['--run=nopath'] + args)
    assert result.exit_code == 1 and '--run: expected NAME=PATH' in result.output
    result = runner.invoke(plot_convergence.main, [f'--run=A={tmp_path}'] + args)
    assert result.exit_code == 1 and 'no metric-fid*.jsonl' in result.output
    assert not (tmp_path / 'x.json').exists()
