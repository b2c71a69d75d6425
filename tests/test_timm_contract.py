"""timm's own model tests (tests/test_models.py of the installed timm's sdist), run on the sd_zoo models.

The sdist is fetched from the package registry at test time into a temporary folder (timm's test code
is not part of this repository). ``GITHUB_ACTIONS`` is set as in timm's CI, which skips the tests that
download every registered weight from the Hub. The test is skipped when the registry is unreachable.
"""
import os
import subprocess
import sys
import tarfile

import pytest
import timm


@pytest.fixture(scope='module')
def timm_tests(tmp_path_factory):
    dest = tmp_path_factory.mktemp('timm_sdist')
    cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
           f'timm=={timm.__version__}', '-d', str(dest)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f'cannot fetch the timm {timm.__version__} sdist from the package registry: {e}')
    archive = next(dest.glob('timm-*.tar.gz'))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(('tests/test_models.py', 'tests/conftest.py'))]
        tar.extractall(dest, members=members, filter='data')
    return next(dest.glob('timm-*/tests'))


@pytest.mark.slow
def test_timm_test_models_passes_on_sd_zoo_models(timm_tests):
    env = dict(os.environ, GITHUB_ACTIONS='true', OMP_NUM_THREADS='1')
    # -p sd_zoo imports the package before collection, so timm's list_models() sees our models;
    # -k sd_ keeps only the parametrisations over them.
    cmd = [sys.executable, '-m', 'pytest', '-p', 'sd_zoo', '-p', 'no:cacheprovider', '-q', '-W', 'ignore',
           '-k', 'sd_', str(timm_tests / 'test_models.py')]
    proc = subprocess.run(cmd, cwd=timm_tests, env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-3000:]
    assert proc.returncode == 0, tail
    summary = tail.strip().splitlines()[-1]
    passed = int(summary.split(' passed')[0].split()[-1])
    # forward, backward, FX forward/backward, TorchScript, forward_features for each of the 10
    # architectures, plus default-cfg checks for each of their pretrained tags.
    assert passed >= 70, summary
    assert 'failed' not in summary and 'error' not in summary, summary


def test_sd_zoo_timm_runs_a_script_unchanged_with_the_models_registered(tmp_path):
    script = tmp_path / 'probe.py'  # stands in for timm's validate.py: it knows nothing of sd_zoo
    script.write_text('import sys, timm\n'
                      'model = timm.create_model(sys.argv[1])\n'
                      'print("built", type(model).__name__, model.num_blocks, sys.argv[2:])\n'
                      'sys.exit(3)\n')
    cmd = [sys.executable, '-m', 'sd_zoo.cli', 'timm', str(script), 'sd_resnet20', '--device', 'cpu']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # the script's own exit status
    assert "built SDCifarResNet 9 ['--device', 'cpu']" in proc.stdout
    proc = subprocess.run([sys.executable, '-m', 'sd_zoo.cli', 'timm', str(tmp_path / 'validate.py')],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and 'no such file' in proc.stderr


def test_the_packages_timm_scripts_need_are_the_timm_scripts_extra(tmp_path, monkeypatch, capsys):
    import tomllib
    from pathlib import Path

    from sd_zoo import cli
    from sd_zoo.cli import timm_scripts
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / 'pyproject.toml').read_text())
    extra = pyproject['project']['optional-dependencies']['timm-scripts']
    assert [req.split('>')[0].split('=')[0] for req in extra] == list(timm_scripts.SCRIPT_PACKAGES)
    script = tmp_path / 'inference.py'
    script.write_text('import pandas\n')
    monkeypatch.setitem(sys.modules, 'pandas', None)  # what `import pandas` meets where it is not installed
    assert cli.main(['timm', str(script)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("sd-zoo timm: error: inference.py needs the Python package 'pandas', which is not installed: "
                   'pip install pandas (or pip install "sd-zoo[timm-scripts]")')
