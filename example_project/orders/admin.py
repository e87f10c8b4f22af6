from django.contrib import admin

from orders.models import Inventory, Order


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("order_no", "good_id", "created_at")
    search_fields = ("order_no",)


@admin.register(Inventory)
class InventoryAdmin(admin.ModelAdmin):
    list_display = ("good_id", "count")
