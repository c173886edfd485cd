"""Ingestion: radiographs (DICOM or exported images, or built-in phantoms) -> DATA/ (image cache + manifest)."""
