"""Reproducible comparisons of SH-PEFT with its peers (programs that print and save results)."""
