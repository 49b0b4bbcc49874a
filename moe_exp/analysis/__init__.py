"""Reading finished runs: the report, the ablation verdicts, the reproduction presets."""
