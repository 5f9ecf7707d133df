"""The evaluation kit: synthetic scenes, the shipped demo model, localization metrics, the Grad-CAM baseline."""
