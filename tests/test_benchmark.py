"""tools/analysis_tools/benchmark.py: every requested variant is measured
in its own process, ratios of the default path to the others are printed
and written as JSON."""
import json
import subprocess
import sys

from conftest import ROOT, load_script


def test_deform_attention_both_modes(tmp_path):
    out = tmp_path / 'bench.json'
    text = subprocess.run(
        [sys.executable, str(ROOT / 'tools/analysis_tools/benchmark.py'),
         '--target', 'deform-attn', '--shape', '1', '16', '12', '10',
         '--mode', 'both', '--variants', 'fast,reference', '--repeat', '2',
         '--warmup', '1', '--json', str(out)],
        check=True, capture_output=True, text=True, timeout=300).stdout
    saved = json.loads(out.read_text())
    assert [r['mode'] for r in saved] == ['infer', 'train']
    for res in saved:
        assert set(res['results']) == {'fast', 'reference'}
        for row in res['results'].values():
            assert len(row['times_s']) == 2 and row['time_s'] > 0
            assert row['peak_mb'] >= 0
        ratio = res['ratios']['time_fast/reference']
        want = (res['results']['fast']['time_s'] /
                res['results']['reference']['time_s'])
        assert abs(ratio - want) < 1e-12
        assert f'time_fast/reference = {ratio:.3f}' in text


def test_every_option_documented():
    bench = load_script(ROOT / 'tools/analysis_tools/benchmark.py')
    parser = bench.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = parser.format_help()
    for opt in ('--device', '--dtype', '--tf32', '--variants', '--target',
                '--keep-going'):
        assert opt in text
    assert 'triton' in text and 'maskrcnn' in text
    args = bench.parse_args(['--device', 'cpu', '--dtype', 'bf16',
                             '--variants', 'triton,swin'])
    assert (args.device, args.dtype, args.tf32) == ('cpu', 'bf16', False)
