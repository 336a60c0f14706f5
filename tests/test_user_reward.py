"""The README's user-written reward works by class_path from the user's own module."""

import json
import re
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]


def test_readme_reward_example_runs_through_the_cli(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# my_rewards\.py.*?)```", readme, re.S).group(1)
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = re.search(r"```yaml\n(model:\n  reward:\n    class_path: my_rewards.*?)```", readme, re.S).group(1)
    (tmp_path / "reward.yaml").write_text(config)

    from rlhf_lit.cli import main

    run_dir = tmp_path / "run"
    with mock.patch.object(sys, "argv", ["python -m rlhf_lit"]):
        cli = main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(tmp_path / "reward.yaml"),
                    f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.enable_progress_bar=false",
                    "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
                    f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}", "--data.batch_size=4",
                    "--model.ppo.ppo_epochs=1", "--model.sampling.max_new_tokens=8"])
    reward = cli.model.reward
    assert type(reward).__name__ == "ExclamationReward" and reward.cap == 3 and reward.scale == 0.5
    assert reward(["p"], ["wow!!!!!"]).scores.tolist() == [1.5]  # min(5, cap 3) * scale 0.5
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["objective/scores"] is not None
