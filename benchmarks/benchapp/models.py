"""One row per task run, stamped by the database's clock."""

from django.db import models


class Row(models.Model):
    """What a benchmark task writes: which variant and run, and when (database time)."""

    variant = models.CharField(max_length=40)
    run = models.IntegerField()
    n = models.IntegerField()
    at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["variant", "run"], name="benchapp_row_variant_run")]

    def __str__(self):
        return f"{self.variant}#{self.run}/{self.n}"


class Item(models.Model):
    """A catalogue the realistic body reads: looked up by its unique ``sku`` three times a task."""

    sku = models.CharField(max_length=40, unique=True)
    stock = models.IntegerField()

    def __str__(self):
        return self.sku


class FloorClaim(models.Model):
    """The least a message record can be: a key and a status (the floor variants write it)."""

    k = models.CharField(max_length=64, primary_key=True)
    status = models.CharField(max_length=1)

    def __str__(self):
        return f"{self.k}: {self.status}"
