"""A URLconf that mounts the metrics view, as a project would."""

from django.contrib import admin
from django.urls import path

from dedup_celery.prometheus import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view),
]
