"""Orders, and the inventory they take from."""

from django.db import models


class Inventory(models.Model):
    """How many items of one good are left."""

    good_id = models.CharField(max_length=50, unique=True)
    count = models.IntegerField()

    class Meta:
        verbose_name_plural = "inventory"

    def __str__(self):
        return f"{self.good_id}: {self.count}"


class Order(models.Model):
    """A placed order. ``order_no`` is unique, as in any order table."""

    order_no = models.CharField(max_length=50, unique=True)
    good_id = models.CharField(max_length=50)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return self.order_no
