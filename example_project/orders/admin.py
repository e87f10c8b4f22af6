from django.contrib import admin

from orders.models import Inventory, Order, PlainOrder

admin.site.register(Order)
admin.site.register(PlainOrder)
admin.site.register(Inventory)
