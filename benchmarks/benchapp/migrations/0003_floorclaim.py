from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("benchapp", "0002_item")]

    operations = [
        migrations.CreateModel(
            name="FloorClaim",
            fields=[
                ("k", models.CharField(max_length=64, primary_key=True, serialize=False)),
                ("status", models.CharField(max_length=1)),
            ],
        ),
    ]
