"""Trainers: one base (TextGuidedTrainer) and thin method classes. User-facing names: see trainers/."""
