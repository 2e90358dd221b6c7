"""pacs-node: a DICOM node that classifies lung CT series and reports back as SR."""

__version__ = "0.1.0"
