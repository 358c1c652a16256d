"""The exercise registrations, one module per chapter.

Each module names its chapter (``CHAPTER = "NN_topic"``, the notebook's file name) and
registers that chapter's exercises with their tests when it is imported. The checker
imports every module of this package, so a new chapter's module is found without being
listed anywhere.
"""
