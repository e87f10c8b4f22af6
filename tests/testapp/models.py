from django.db import models


class Effect(models.Model):
    """One business side effect of a task body (what must happen once per message)."""

    tag = models.CharField(max_length=100)
    n = models.IntegerField()
    task_id = models.CharField(max_length=255)
    retries = models.IntegerField(default=0)
    pid = models.IntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["tag", "n"], name="testapp_effect_tag_n")]

    def __str__(self):
        return f"{self.tag}#{self.n} by {self.task_id}"
