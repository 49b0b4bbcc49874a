"""LightningDataModules for the dataset axis (``data=``)."""
