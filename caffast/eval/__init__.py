"""The evaluation kit: synthetic scenes, the shipped demo model, localization metrics, the Grad-CAM baseline,
and dataset annotations with the CAM localization protocol."""
