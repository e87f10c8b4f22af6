from django.db import models


class Effect(models.Model):
    """One business side effect of a task body (what must happen once per message)."""

    tag = models.CharField(max_length=100)
    n = models.IntegerField()
    task_id = models.TextField()
    retries = models.IntegerField(default=0)
    pid = models.IntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["tag", "n"], name="testapp_effect_tag_n")]

    def __str__(self):
        return f"{self.tag}#{self.n} by {self.task_id}"


class DeferredUnique(models.Model):
    """A row whose uniqueness PostgreSQL checks at COMMIT, not at the INSERT.

    A body that breaks it returns normally and its transaction's COMMIT raises
    an IntegrityError: an error no retry can fix.
    """

    tag = models.CharField(max_length=100)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tag"],
                name="testapp_deferred_unique_tag",
                deferrable=models.Deferrable.DEFERRED,
            )
        ]

    def __str__(self):
        return self.tag
