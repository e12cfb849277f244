"""What a trained model's decisions rest on: the exact decision audit, the metrics, GradCAM and the faithfulness checks."""
