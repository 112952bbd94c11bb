"""SH-PEFT for MONAI."""
