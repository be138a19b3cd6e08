"""The README's examples run as written (with the digits shrunk to test size)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = ('config.update(dict(image_size=8, crop_size=8, batch_size=16, queue_size=32, embed_dim=8, '
        'num_train_steps=3)); config.model.width = 4')


def _python_block(after: str) -> str:
    """The first ```python block of the README after the text `after`."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S).group(1)


def test_the_own_training_loop_example_trains(capsys):
    code = _python_block("Use the MoCo step in your own training loop")
    loader = 'config = load_config_file("configs/default.py")'
    assert loader in code
    code = code.replace(loader, f"{loader}\n{TINY}")
    rng = np.random.default_rng(0)
    namespace = {"num_images": 64, "next_batch": lambda: rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out.split()
    assert printed[0] == "0" and np.isfinite(float(printed[1]))
    assert int(namespace["state"].step) == 3
