"""Web forms; Flask-WTF adds and checks a CSRF token on every one."""

from __future__ import annotations

from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from wtforms import IntegerField, PasswordField, RadioField, StringField
from wtforms.validators import DataRequired, NumberRange


class LoginForm(FlaskForm):
    username = StringField("User", validators=[DataRequired()])
    password = PasswordField("Password", validators=[DataRequired()])


class UploadForm(FlaskForm):
    image = FileField("Image", validators=[FileRequired()])


class BoxForm(FlaskForm):
    box = RadioField("Search with", choices=[("whole", "the whole image")], default="whole")
    k = IntegerField("Results", default=10, validators=[NumberRange(min=1)])


class LogoutForm(FlaskForm):
    pass
